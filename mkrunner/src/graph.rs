//! The fourth stage: the dependency graph for one target, built as mk's `graph()` does.
//!
//! Every explicit rule for a name, then every metarule whose pattern matches it, contributes
//! arcs to the name's node; prerequisites become nodes in turn. Then, as mk does: cycles are
//! errors, metarule arcs into nodes that cannot be made ("vacuous") are dropped, explicit
//! recipes beat meta recipes and two different recipes are ambiguous, and attributes flow
//! from rules to nodes.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::archive;
use crate::error::Error;
use crate::expand::{match_pattern, substitute_stem};
use crate::parser::{Attributes, Rule, RuleSet};

pub(crate) type NodeId = usize;

pub(crate) const VIRTUAL: u32 = 0x0001;
pub(crate) const CYCLE: u32 = 0x0002;
pub(crate) const READY: u32 = 0x0004;
pub(crate) const CAN_PRETEND: u32 = 0x0008;
pub(crate) const PRETENDING: u32 = 0x0010;
pub(crate) const NOT_MADE: u32 = 0x0020;
pub(crate) const BEING_MADE: u32 = 0x0040;
pub(crate) const MADE: u32 = 0x0080;
pub(crate) const PROBABLE: u32 = 0x0100;
pub(crate) const VACUOUS: u32 = 0x0200;
pub(crate) const NO_RECIPE: u32 = 0x0400;
pub(crate) const DELETE: u32 = 0x0800;
/// Checked for cycles, and none found below (kept for later targets).
const CYCLE_FREE: u32 = 0x1000;
/// Its recipe chosen by `ambiguous()` (kept for later targets).
const RECIPE_CHECKED: u32 = 0x2000;

/// The name mk gives the rule it makes up for several command-line targets.
pub const COMMAND_LINE_TARGET: &str = "command line arguments";

#[derive(Debug, Clone)]
pub(crate) struct Arc {
    pub node: Option<NodeId>,
    pub rule: usize,
    pub stem: String,
    /// `$stem0`…`$stem9` for `:R:` rules.
    pub matches: Vec<Option<String>>,
    pub remove: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// Shared with [`Graph::by_name`]'s key: a pathological graph has millions of names.
    pub name: Rc<str>,
    /// Modification time in seconds; 0 for a missing file or a virtual target.
    pub time: u64,
    pub flags: u32,
    pub arcs: Vec<Arc>,
    /// The other nodes one recipe run makes (mk's `node->next` list).
    pub next: Option<NodeId>,
}

impl Node {
    pub fn set_made(&mut self, state: u32) {
        self.flags = (self.flags & !(NOT_MADE | BEING_MADE | MADE)) | state;
    }
}

/// The graph of every name mk has looked at in this run (nodes persist between targets).
#[derive(Debug)]
pub(crate) struct Graph<'m> {
    rules: &'m RuleSet,
    extra: Vec<Rule>,
    extra_targets: HashMap<String, Vec<usize>>,
    pub nodes: Vec<Node>,
    pub by_name: HashMap<Rc<str>, NodeId>,
    times: HashMap<String, u64>,
    directory: PathBuf,
    /// Per archive, its modification time when its members were last read.
    archives: HashMap<String, u64>,
    /// `archive(member)` → the member's date in the archive.
    member_times: HashMap<String, u64>,
    /// Missing archives already announced.
    announced: HashSet<String>,
    /// Lines for mk's standard output, printed by the caller (the archive notice).
    pub notices: Vec<String>,
}

impl<'m> Graph<'m> {
    pub fn new(rules: &'m RuleSet, directory: &Path) -> Self {
        Graph {
            rules,
            extra: Vec::new(),
            extra_targets: HashMap::new(),
            nodes: Vec::new(),
            by_name: HashMap::new(),
            times: HashMap::new(),
            directory: directory.to_path_buf(),
            archives: HashMap::new(),
            member_times: HashMap::new(),
            announced: HashSet::new(),
            notices: Vec::new(),
        }
    }

    pub fn rule(&self, index: usize) -> &Rule {
        match index.checked_sub(self.rules.rules.len()) {
            None => &self.rules.rules[index],
            Some(extra) => &self.extra[extra],
        }
    }

    /// Add the virtual rule mk makes up when given several targets.
    pub fn add_command_line_rule(&mut self, targets: &[String]) {
        let index = self.rules.rules.len() + self.extra.len();
        self.extra.push(Rule {
            target: COMMAND_LINE_TARGET.to_string(),
            targets: vec![COMMAND_LINE_TARGET.to_string()],
            prereqs: targets.to_vec(),
            attributes: Attributes {
                is_virtual: true,
                ..Attributes::default()
            },
            recipe: String::new(),
            is_meta: false,
            file: "command line".to_string(),
            line: 0,
            shell: vec!["sh".to_string()],
            recipe_id: 0,
            regex: None,
        });
        self.extra_targets
            .entry(COMMAND_LINE_TARGET.to_string())
            .or_default()
            .push(index);
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.directory.join(name)
    }

    /// The modification time of `name` in seconds, 0 when it does not exist.
    pub fn mtime(&self, name: &str) -> u64 {
        std::fs::metadata(self.path(name))
            .and_then(|metadata| metadata.modified())
            .ok()
            .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |duration| duration.as_secs())
    }

    /// mk's `timeof`: cached unless `force`; an archive member's is its date in the archive.
    pub fn time_of(&mut self, name: &str, force: bool) -> Result<u64, Error> {
        if let Some((archive, member)) = archive::split(name) {
            return self.member_time(name, archive, member, force);
        }
        Ok(self.file_time(name, force))
    }

    fn file_time(&mut self, name: &str, force: bool) -> u64 {
        if force {
            return self.mtime(name);
        }
        if let Some(&time) = self.times.get(name) {
            return time;
        }
        let time = self.mtime(name);
        if time != 0 {
            self.times.insert(name.to_string(), time);
        }
        time
    }

    /// mk's `atimeof`: read the archive's member dates when it is new to us or has changed
    /// (or `force`), then look the member up (0 when the archive lacks it).
    fn member_time(
        &mut self,
        name: &str,
        archive: &str,
        member: &str,
        force: bool,
    ) -> Result<u64, Error> {
        let path = self.path(archive);
        match archive::kind(&path) {
            archive::Kind::Missing => {
                if !archive.ends_with(".a") && self.announced.insert(archive.to_string()) {
                    self.notices.push(format!(
                        "{archive} doesn't exist: assuming it will be an archive\n"
                    ));
                }
            }
            archive::Kind::Archive => {}
            archive::Kind::NotAnArchive => {
                return Err(Error::NotAnArchive {
                    name: name.to_string(),
                });
            }
        }
        let time = self.mtime(archive);
        let stale = match self.archives.get(archive) {
            Some(&read_at) => force || time > read_at,
            None => true,
        };
        if stale {
            for (member, date) in archive::member_dates(&path) {
                self.member_times
                    .insert(format!("{archive}({member})"), date);
            }
            self.archives.insert(archive.to_string(), time);
        }
        let key = format!("{archive}({member})");
        Ok(self.member_times.get(&key).copied().unwrap_or(0))
    }

    /// `-w`: pretend these files were just modified.
    pub fn assume_modified(&mut self, names: &[String], now: u64) {
        for name in names {
            self.times.insert(name.clone(), now);
        }
    }

    pub fn exists(&self, name: &str) -> bool {
        self.path(name).symlink_metadata().is_ok()
    }

    /// Build (or find) the graph for `target` and prepare it as mk's `graph()` does.
    pub fn graph(&mut self, target: &str) -> Result<NodeId, Error> {
        let mut in_use = vec![0u8; self.rules.rules.len() + self.extra.len()];
        let node = self.apply_rules(target, &mut in_use)?;
        self.check_cycles(node)?;
        self.nodes[node].flags |= PROBABLE;
        self.vacuous(node);
        self.ambiguous(node)?;
        self.attribute(node);
        Ok(node)
    }

    fn new_node(&mut self, name: &str) -> Result<NodeId, Error> {
        let time = self.time_of(name, false)?;
        let id = self.nodes.len();
        let name: Rc<str> = Rc::from(name);
        self.by_name.insert(Rc::clone(&name), id);
        self.nodes.push(Node {
            name,
            time,
            flags: if time != 0 { PROBABLE } else { 0 },
            arcs: Vec::new(),
            next: None,
        });
        Ok(id)
    }

    /// mk's `applyrules()`: the node for `target` with an arc for each prerequisite of each
    /// rule that applies, and the same for every prerequisite new to the graph. mk recurses
    /// once per prerequisite level; this keeps the levels on a stack of its own, so a long
    /// chain of rules needs no more thread stack than a short one. A rule being expanded
    /// further up (`in_use`) does not apply again below.
    fn apply_rules(&mut self, target: &str, in_use: &mut [u8]) -> Result<NodeId, Error> {
        if let Some(&node) = self.by_name.get(target) {
            return Ok(node);
        }
        let mut stack = vec![self.expansion(target)?];
        loop {
            let Some(expansion) = stack.last_mut() else {
                unreachable!("the loop returns when the last expansion ends");
            };
            match self.next_prerequisite(expansion, in_use) {
                Some(name) => match self.by_name.get(name.as_str()) {
                    Some(&child) => expansion.add_arc(child),
                    None => {
                        let child = self.expansion(&name)?;
                        stack.push(child);
                    }
                },
                None => {
                    let Some(mut done) = stack.pop() else {
                        unreachable!("the expansion was on the stack");
                    };
                    let node = done.node;
                    done.arcs.append(&mut self.nodes[node].arcs);
                    // Most nodes keep few arcs; a pathological graph has very many nodes.
                    done.arcs.shrink_to_fit();
                    self.nodes[node].arcs = done.arcs;
                    match stack.last_mut() {
                        Some(parent) => parent.add_arc(node),
                        None => return Ok(node),
                    }
                }
            }
        }
    }

    fn expansion(&mut self, target: &str) -> Result<Expansion, Error> {
        let node = self.new_node(target)?;
        let explicit: Vec<usize> = self
            .rules
            .by_target
            .get(target)
            .into_iter()
            .chain(self.extra_targets.get(target))
            .flatten()
            .copied()
            .collect();
        Ok(Expansion {
            node,
            target: target.to_string(),
            explicit,
            next_explicit: 0,
            next_meta: 0,
            current: None,
            arcs: Vec::new(),
        })
    }

    /// The next prerequisite of `expansion` that needs a node, after adding the arcs that
    /// need none (rules without prerequisites); `None` when every rule has been tried.
    fn next_prerequisite(
        &mut self,
        expansion: &mut Expansion,
        in_use: &mut [u8],
    ) -> Option<String> {
        loop {
            if let Some(current) = &mut expansion.current {
                if let Some(prereq) = self.rule(current.rule).prereqs.get(current.next) {
                    current.next += 1;
                    let rule = self.rule(current.rule);
                    return Some(if !rule.is_meta {
                        prereq.clone()
                    } else if rule.regex.is_some() {
                        regex_substitute(prereq, &current.matches)
                    } else {
                        substitute_stem(&current.stem, prereq)
                    });
                }
                in_use[current.rule] -= 1;
                expansion.current = None;
            }
            let (rule, stem, matches) = self.next_rule(expansion, in_use)?;
            if !self.rule(rule).is_meta {
                self.nodes[expansion.node].flags |= PROBABLE;
            }
            if self.rule(rule).prereqs.is_empty() {
                expansion.arcs.push(arc(None, rule, stem, matches));
            } else {
                in_use[rule] += 1;
                expansion.current = Some(Applying {
                    rule,
                    stem,
                    matches,
                    next: 0,
                });
            }
        }
    }

    /// The next rule that applies to the expansion's target: its explicit rules first, then
    /// the metarules whose pattern matches, each with its stem (and `:R:` groups).
    fn next_rule(
        &self,
        expansion: &mut Expansion,
        in_use: &[u8],
    ) -> Option<(usize, String, Vec<Option<String>>)> {
        while let Some(&index) = expansion.explicit.get(expansion.next_explicit) {
            expansion.next_explicit += 1;
            let rule = self.rule(index);
            if rule.is_meta || !rule.has_effect() || in_use[index] >= 1 {
                continue;
            }
            return Some((index, String::new(), Vec::new()));
        }
        let rules = self.rules;
        let target = expansion.target.as_str();
        while let Some(&index) = rules.meta.get(expansion.next_meta) {
            expansion.next_meta += 1;
            let rule = &rules.rules[index];
            if !rule.has_effect() {
                continue;
            }
            if rule.attributes.not_virtual
                && expansion
                    .arcs
                    .last()
                    .is_some_and(|last| self.rule(last.rule).attributes.is_virtual)
            {
                continue;
            }
            let mut stem = String::new();
            let mut matches = Vec::new();
            if let Some(regex) = &rule.regex {
                let Some(captures) = regex.captures(target) else {
                    continue;
                };
                let start = captures.get(0).map_or(0, |m| m.start());
                matches.push(Some(target[start..].to_string()));
                for group in 1..10 {
                    matches.push(captures.get(group).map(|m| m.as_str().to_string()));
                }
            } else {
                match match_pattern(target, &rule.target) {
                    Some(found) => stem = found,
                    None => continue,
                }
            }
            if in_use[index] >= 1 {
                continue;
            }
            return Some((index, stem, matches));
        }
        None
    }

    fn check_cycles(&mut self, node: NodeId) -> Result<(), Error> {
        // Each entry is a node on the current path and the index of its next arc.
        let mut path: Vec<(NodeId, usize)> = Vec::new();
        let mut next = Some(node);
        loop {
            if let Some(node) = next.take()
                && self.nodes[node].flags & CYCLE_FREE == 0
            {
                if self.nodes[node].flags & CYCLE != 0 && !self.nodes[node].arcs.is_empty() {
                    for &(on_path, _) in &path {
                        self.nodes[on_path].flags &= !CYCLE;
                    }
                    return Err(Error::Cycle {
                        target: self.nodes[node].name.to_string(),
                    });
                }
                self.nodes[node].flags |= CYCLE;
                path.push((node, 0));
            }
            let Some((node, index)) = path.last_mut() else {
                return Ok(());
            };
            match self.nodes[*node].arcs.get(*index) {
                Some(arc) => {
                    *index += 1;
                    next = arc.node;
                }
                None => {
                    let node = *node;
                    path.pop();
                    self.nodes[node].flags = (self.nodes[node].flags & !CYCLE) | CYCLE_FREE;
                }
            }
        }
    }

    /// Whether `node` cannot be made: mk's `vacuous()`, which also drops the metarule arcs
    /// into such nodes. Children are decided before their parents, on a stack of our own.
    fn vacuous(&mut self, node: NodeId) -> bool {
        // A node on the stack, whether it is vacuous so far, and its next arc.
        let mut stack: Vec<(NodeId, bool, usize)> = Vec::new();
        let mut answer = self.enter_vacuous(node, &mut stack);
        while let Some((node, vacuous, index)) = stack.last_mut() {
            let node = *node;
            if *index > 0 {
                // `answer` is the child's of the arc just before `index`.
                let arc = &self.nodes[node].arcs[*index - 1];
                if answer && self.rule(arc.rule).is_meta {
                    self.nodes[node].arcs[*index - 1].remove = true;
                } else {
                    *vacuous = false;
                }
            }
            let Some(arc) = self.nodes[node].arcs.get(*index) else {
                let vacuous = *vacuous;
                stack.pop();
                answer = self.leave_vacuous(node, vacuous);
                continue;
            };
            *index += 1;
            answer = match arc.node {
                Some(child) => self.enter_vacuous(child, &mut stack),
                // An arc with no prerequisite always stays.
                None => false,
            };
        }
        answer
    }

    /// Start deciding `node`: its answer if already known (or being decided: not vacuous
    /// yet), else put it on the stack.
    fn enter_vacuous(&mut self, node: NodeId, stack: &mut Vec<(NodeId, bool, usize)>) -> bool {
        if self.nodes[node].flags & READY != 0 {
            return self.nodes[node].flags & VACUOUS != 0;
        }
        self.nodes[node].flags |= READY;
        stack.push((node, self.nodes[node].flags & PROBABLE == 0, 0));
        false
    }

    fn leave_vacuous(&mut self, node: NodeId, vacuous: bool) -> bool {
        // If a rule made arcs that stay, none of that rule's arcs go.
        let kept_rules: HashSet<usize> = self.nodes[node]
            .arcs
            .iter()
            .filter(|a| !a.remove)
            .map(|a| a.rule)
            .collect();
        for arc in &mut self.nodes[node].arcs {
            if arc.remove && kept_rules.contains(&arc.rule) {
                arc.remove = false;
            }
        }
        self.nodes[node].arcs.retain(|a| !a.remove);
        self.nodes[node].arcs.shrink_to_fit();
        if vacuous {
            self.nodes[node].flags |= VACUOUS;
        }
        vacuous
    }

    /// mk's `ambiguous()`, children before parents: a node's own check reads only its own
    /// arcs, so checking it after all its children finds the same first error as mk.
    fn ambiguous(&mut self, node: NodeId) -> Result<(), Error> {
        if self.nodes[node].flags & RECIPE_CHECKED != 0 {
            return Ok(());
        }
        self.nodes[node].flags |= RECIPE_CHECKED;
        let mut stack: Vec<(NodeId, usize)> = vec![(node, 0)];
        while let Some((node, index)) = stack.last_mut() {
            let node = *node;
            match self.nodes[node].arcs.get(*index) {
                Some(arc) => {
                    *index += 1;
                    if let Some(child) = arc.node
                        && self.nodes[child].flags & RECIPE_CHECKED == 0
                    {
                        self.nodes[child].flags |= RECIPE_CHECKED;
                        stack.push((child, 0));
                    }
                }
                None => {
                    stack.pop();
                    self.choose_recipe(node)?;
                }
            }
        }
        Ok(())
    }

    /// One node's part of `ambiguous()`: an explicit recipe beats meta ones, and two
    /// different recipes are an error.
    fn choose_recipe(&mut self, node: NodeId) -> Result<(), Error> {
        let mut chosen: Option<usize> = None;
        let mut bad: Vec<String> = Vec::new();
        for index in 0..self.nodes[node].arcs.len() {
            let rule_index = self.nodes[node].arcs[index].rule;
            if self.rule(rule_index).recipe.is_empty() {
                continue;
            }
            let Some(current) = chosen else {
                chosen = Some(index);
                continue;
            };
            let current_rule = self.rule(self.nodes[node].arcs[current].rule);
            let rule = self.rule(rule_index);
            let mut current_index = current;
            if current_rule.recipe_id != rule.recipe_id {
                if current_rule.is_meta && !rule.is_meta {
                    self.nodes[node].arcs[current].remove = true;
                    chosen = Some(index);
                    current_index = index;
                } else if !current_rule.is_meta && rule.is_meta {
                    self.nodes[node].arcs[index].remove = true;
                    continue;
                }
            }
            let current_rule = self.rule(self.nodes[node].arcs[current_index].rule);
            let rule = self.rule(rule_index);
            if current_rule.recipe_id != rule.recipe_id {
                if bad.is_empty() {
                    bad.push(format!("{}:{}", current_rule.file, current_rule.line));
                }
                bad.push(format!("{}:{}", rule.file, rule.line));
            }
        }
        if !bad.is_empty() {
            return Err(Error::Ambiguous {
                target: self.nodes[node].name.to_string(),
                rules: bad,
            });
        }
        self.nodes[node].arcs.retain(|a| !a.remove);
        Ok(())
    }

    /// Attributes flow from rules to the nodes they make (mk's `attribute()`); the order
    /// nodes are visited in does not matter, so a plain stack walks the graph.
    fn attribute(&mut self, node: NodeId) {
        let mut seen = vec![false; self.nodes.len()];
        let mut stack = vec![node];
        while let Some(node) = stack.pop() {
            if std::mem::replace(&mut seen[node], true) {
                continue;
            }
            let mut flags = 0;
            for arc in &self.nodes[node].arcs {
                let attributes = &self.rule(arc.rule).attributes;
                if attributes.is_virtual {
                    flags |= VIRTUAL;
                }
                if attributes.no_recipe_ok {
                    flags |= NO_RECIPE;
                }
                if attributes.delete_on_error {
                    flags |= DELETE;
                }
                if let Some(child) = arc.node {
                    stack.push(child);
                }
            }
            self.nodes[node].flags |= flags;
            if self.nodes[node].flags & VIRTUAL != 0 {
                self.nodes[node].time = 0;
            }
        }
    }
}

/// A node whose arcs [`Graph::apply_rules`] is building.
struct Expansion {
    node: NodeId,
    target: String,
    /// The explicit rules for the target, and the next of them (then of the metarules) to try.
    explicit: Vec<usize>,
    next_explicit: usize,
    next_meta: usize,
    /// The rule whose prerequisites are being added.
    current: Option<Applying>,
    arcs: Vec<Arc>,
}

struct Applying {
    rule: usize,
    stem: String,
    matches: Vec<Option<String>>,
    /// The next prerequisite of the rule.
    next: usize,
}

impl Expansion {
    /// An arc to `child`, the prerequisite just returned by `next_prerequisite`.
    fn add_arc(&mut self, child: NodeId) {
        if let Some(current) = &self.current {
            self.arcs.push(arc(
                Some(child),
                current.rule,
                current.stem.clone(),
                current.matches.clone(),
            ));
        }
    }
}

fn arc(node: Option<NodeId>, rule: usize, stem: String, matches: Vec<Option<String>>) -> Arc {
    Arc {
        node,
        rule,
        stem,
        matches,
        remove: false,
    }
}

/// Plan 9 `regsub`: `\0`…`\9` become the matched groups; other backslashes quote.
pub(crate) fn regex_substitute(template: &str, matches: &[Option<String>]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(digit @ '0'..='9') => {
                let group = digit as usize - '0' as usize;
                if let Some(Some(text)) = matches.get(group) {
                    out.push_str(text);
                }
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}
