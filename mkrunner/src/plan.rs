//! The fifth stage: decide what is out of date and in what order recipes run, as mk's
//! `work()`, `dorecipe()` and `waitup()` do, and hand each recipe to the runner.
//!
//! `-n` (a [`Plan`]) walks the same state machine without running anything, so the plan and
//! the build cannot disagree.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::mpsc;

use crate::Mkfile;
use crate::error::{Error, Warning};
use crate::exec::{Command, Outcome, Runner, RunnerError};
use crate::expand::{Quoting, echo_text_with};
use crate::graph::{
    BEING_MADE, CAN_PRETEND, DELETE, Graph, MADE, NO_RECIPE, NOT_MADE, NodeId, PRETENDING, READY,
    VIRTUAL,
};

/// mk's flags.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// `-n`: print the recipes that would run, run nothing.
    pub dry_run: bool,
    /// `-t`: touch out-of-date targets instead of running recipes.
    pub touch: bool,
    /// `-a`: everything is out of date.
    pub all: bool,
    /// `-i`: make missing intermediate targets even when nothing needs them (also set by `-a`).
    pub make_intermediates: bool,
    /// `-k`: keep going after a recipe fails, making what does not depend on it.
    pub keep_going: bool,
    /// `-e`: explain why each target is made.
    pub explain: bool,
    /// `-s`: make each command-line target separately, one after another.
    pub separately: bool,
    /// `-w`: pretend these files were just modified.
    pub assume_modified: Vec<String>,
}

/// One recipe run, as the plan or the build saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// `$target`: the out-of-date targets this run makes.
    pub targets: Vec<String>,
    /// `$alltarget`: every target of the rule.
    pub all_targets: Vec<String>,
    /// `$prereq` and `$newprereq`.
    pub prereqs: Vec<String>,
    pub new_prereqs: Vec<String>,
    /// `$stem` (empty for explicit and `:R:` rules).
    pub stem: String,
    /// The recipe as the shell gets it.
    pub recipe: String,
    /// The recipe as mk echoes it (variables mk set are expanded).
    pub echo: String,
    /// Whether mk echoes it (`Q` rules do not, except under `-n`).
    pub quiet: bool,
    /// Where the rule is (`mkfile:12`).
    pub rule: String,
}

/// The recipes a target needs, in the order mk would run them with `NPROC=1`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    jobs: Vec<Job>,
    /// The targets reported up to date (nothing to do).
    pub up_to_date: Vec<String>,
}

impl Plan {
    pub fn jobs(&self) -> &[Job] {
        &self.jobs
    }
}

/// What a build did; a failure that stops the build is the `Err` of [`Mkfile::build`].
#[derive(Debug, Default)]
pub struct BuildReport {
    pub jobs: Vec<Job>,
    /// Failures `-k` carried on from, and non-fatal problems (a file that would not delete).
    pub errors: Vec<Error>,
    pub warnings: Vec<Warning>,
}

impl Mkfile {
    /// What `mk -n targets` would run; nothing runs except `P` programs, through `runner`.
    pub fn plan(
        &self,
        targets: &[&str],
        options: &BuildOptions,
        runner: &dyn Runner,
    ) -> Result<Plan, Error> {
        let mut options = options.clone();
        options.dry_run = true;
        let mut sink = std::io::sink();
        let targets: Vec<String> = targets.iter().map(|s| s.to_string()).collect();
        let mut plan = Plan::default();
        let report = self.run_build(&targets, &options, runner, &mut sink, &mut plan.up_to_date)?;
        plan.jobs = report.jobs;
        Ok(plan)
    }

    /// Make `targets` (the default targets when empty), writing what mk prints on standard
    /// output (echoed recipes, `mk: 'x' is up to date`) to `output`; recipes run through
    /// `runner`, whose processes write their own output.
    pub fn build(
        &self,
        targets: &[String],
        options: &BuildOptions,
        runner: &dyn Runner,
        output: &mut dyn Write,
    ) -> Result<BuildReport, Error> {
        let mut up_to_date = Vec::new();
        self.run_build(targets, options, runner, output, &mut up_to_date)
    }

    fn run_build(
        &self,
        targets: &[String],
        options: &BuildOptions,
        runner: &dyn Runner,
        output: &mut dyn Write,
        up_to_date: &mut Vec<String>,
    ) -> Result<BuildReport, Error> {
        let (sender, receiver) = mpsc::channel::<(usize, Result<Outcome, RunnerError>)>();
        std::thread::scope(|scope| {
            let spawn = |slot: usize, command: Command| {
                let sender = sender.clone();
                scope.spawn(move || {
                    let result = runner.run(&command);
                    // The receiver outlives every job; a failed send means the build is over.
                    let _ = sender.send((slot, result));
                });
            };
            let mut build = Build::new(self, options, runner, output, &spawn, &receiver);
            let result = build.make_all(targets, up_to_date);
            // mk waits for running recipes before it exits, whatever happened.
            build.drain();
            build.flush();
            result.map(|()| build.report)
        })
    }
}

struct PendingJob {
    rule: usize,
    nodes: Vec<NodeId>,
    job: Job,
    /// `$target`, `$stem`…: added to the exported variables when the recipe starts.
    internal: Vec<(&'static str, Vec<String>)>,
}

struct Running {
    targets: Vec<String>,
    nodes: Vec<NodeId>,
    echo: String,
}

struct Build<'a, 'm> {
    mkfile: &'m Mkfile,
    graph: Graph<'m>,
    options: &'a BuildOptions,
    runner: &'a dyn Runner,
    output: &'a mut dyn Write,
    spawn: &'a dyn Fn(usize, Command),
    receiver: &'a mpsc::Receiver<(usize, Result<Outcome, RunnerError>)>,
    base_environment: Vec<(String, Vec<String>)>,
    queue: VecDeque<PendingJob>,
    slots: Vec<Option<Running>>,
    running: usize,
    limit: usize,
    run_errors: usize,
    report: BuildReport,
    /// What [`Build::print`] wrote and nothing has flushed yet.
    buffer: Vec<u8>,
    program_cache: std::collections::HashMap<(String, String), bool>,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl<'a, 'm> Build<'a, 'm> {
    fn new(
        mkfile: &'m Mkfile,
        options: &'a BuildOptions,
        runner: &'a dyn Runner,
        output: &'a mut dyn Write,
        spawn: &'a dyn Fn(usize, Command),
        receiver: &'a mpsc::Receiver<(usize, Result<Outcome, RunnerError>)>,
    ) -> Self {
        let mut graph = Graph::new(&mkfile.rules, &mkfile.directory);
        graph.assume_modified(&options.assume_modified, now());
        let variables = &mkfile.variables;
        let base_environment = variables
            .iter()
            .filter(|(name, _)| variables.is_exported(name))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        Build {
            mkfile,
            graph,
            options,
            runner,
            output,
            spawn,
            receiver,
            base_environment,
            queue: VecDeque::new(),
            slots: Vec::new(),
            running: 0,
            limit: 1,
            run_errors: 0,
            report: BuildReport::default(),
            buffer: Vec::with_capacity(OUTPUT_BUFFER),
            program_cache: std::collections::HashMap::new(),
        }
    }

    fn make_intermediates(&self) -> bool {
        self.options.make_intermediates || self.options.all
    }

    /// Write to mk's buffered standard output (9base's `bout`): echoes, notices, "up to
    /// date". Like libbio, a full buffer is written out when more text comes.
    fn print(&mut self, text: &str) {
        let mut bytes = text.as_bytes();
        while !bytes.is_empty() {
            if self.buffer.len() == OUTPUT_BUFFER {
                self.write_buffer();
            }
            let take = bytes.len().min(OUTPUT_BUFFER - self.buffer.len());
            self.buffer.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
        }
    }

    /// Write past the buffer, as 9base's `fprint(1, …)` does for `-e` explanations: they
    /// come out before echoes still buffered (all of them first under `-n`).
    fn print_direct(&mut self, text: &str) {
        // mk's standard output failing (a closed pipe) is not a reason to stop recipes.
        let _ = self.output.write_all(text.as_bytes());
        let _ = self.output.flush();
    }

    fn write_buffer(&mut self) {
        let _ = self.output.write_all(&self.buffer);
        self.buffer.clear();
    }

    fn print_notices(&mut self) {
        for notice in std::mem::take(&mut self.graph.notices) {
            self.print(&notice);
        }
    }

    /// 9base's `Bflush(&bout)`: before a recipe or a `P` program starts, and at the end.
    fn flush(&mut self) {
        self.write_buffer();
        let _ = self.output.flush();
    }

    fn make_all(&mut self, targets: &[String], up_to_date: &mut Vec<String>) -> Result<(), Error> {
        // mk skips empty arguments: under rc `mk $MKFLAGS $target` passes one when there
        // are no flags, and it must not become a target a metarule could match.
        let targets: Vec<String> = targets
            .iter()
            .filter(|target| !target.is_empty())
            .cloned()
            .collect();
        if targets.is_empty() {
            let defaults = self.mkfile.default_targets.clone();
            if defaults.is_empty() {
                return Err(Error::NothingToMk);
            }
            for target in &defaults {
                self.mk(target, up_to_date)?;
            }
        } else if self.options.separately || targets.len() == 1 {
            for target in &targets {
                self.mk(target, up_to_date)?;
            }
        } else {
            self.graph.add_command_line_rule(&targets);
            self.mk(crate::graph::COMMAND_LINE_TARGET, up_to_date)?;
        }
        Ok(())
    }

    /// mk's `nproc()`: read `NPROC` (set in the mkfile, on the command line or in the
    /// environment). Job slots are not allocated here: they grow with the jobs running.
    fn nproc(&mut self) -> Result<(), Error> {
        let word = self
            .mkfile
            .variables
            .get("NPROC")
            .and_then(|words| words.first())
            .filter(|word| !word.is_empty());
        if let Some(word) = word {
            self.limit = nproc_limit(word)?;
        }
        Ok(())
    }

    fn mk(&mut self, target: &str, up_to_date: &mut Vec<String>) -> Result<(), Error> {
        self.nproc()?;
        self.run_errors = 0;
        let node = self.graph.graph(target);
        self.print_notices();
        let node = node?;
        self.clear_made(node);
        let mut did = false;
        while self.graph.nodes[node].flags & NOT_MADE != 0 {
            if self.work(node, None)? {
                did = true;
            } else if self.wait_one()?
                && self.graph.nodes[node].flags & (NOT_MADE | BEING_MADE) != 0
            {
                break;
            }
        }
        // 9base then waits for the target's own recipe (`waitup(-1)`). A target that is
        // being made with nothing running is one `-k` gave up on (it could not be made):
        // the wait finds no child, and 9base stops with status 1 (`No child processes`).
        if self.graph.nodes[node].flags & BEING_MADE != 0 && self.running == 0 {
            return Err(Error::DontKnowHow {
                target: self.graph.nodes[node].name.to_string(),
                directory: current_directory(&self.mkfile.directory),
            });
        }
        while self.running > 0 || !self.queue.is_empty() {
            if self.wait_one()? {
                break;
            }
        }
        if !did {
            let name = self.graph.nodes[node].name.to_string();
            self.print(&format!("mk: '{name}' is up to date\n"));
            up_to_date.push(name);
        }
        Ok(())
    }

    /// mk's `clrmade()`: every node under `node` is to be made again.
    fn clear_made(&mut self, node: NodeId) {
        let mut seen = vec![false; self.graph.nodes.len()];
        let mut stack = vec![node];
        while let Some(node) = stack.pop() {
            if std::mem::replace(&mut seen[node], true) {
                continue;
            }
            let n = &mut self.graph.nodes[node];
            n.flags &= !(CAN_PRETEND | PRETENDING);
            if !n.name.contains('(') || n.time != 0 {
                n.flags |= CAN_PRETEND;
            }
            n.set_made(NOT_MADE);
            stack.extend(n.arcs.iter().rev().filter_map(|a| a.node));
        }
    }

    fn unpretend(&mut self, node: NodeId) {
        let n = &mut self.graph.nodes[node];
        n.set_made(NOT_MADE);
        n.flags &= !(CAN_PRETEND | PRETENDING);
        n.time = 0;
    }

    /// mk's `work()`: returns whether something was started (or, under `-n`, printed).
    ///
    /// mk's `work()` calls itself for each prerequisite; here each call is a [`Visit`] on a
    /// stack of our own and [`Build::step`] runs one until it needs a prerequisite's answer,
    /// so a long chain of rules needs no more thread stack than a short one.
    fn work(&mut self, node: NodeId, parent: Option<(NodeId, usize)>) -> Result<bool, Error> {
        let mut stack = vec![Visit::new(node, parent)];
        let mut answer = false;
        loop {
            let Some(visit) = stack.last_mut() else {
                unreachable!("the loop returns when the last visit ends");
            };
            match self.step(visit, answer)? {
                Next::Visit(child) => stack.push(child),
                Next::Return(did) => {
                    stack.pop();
                    if stack.is_empty() {
                        return Ok(did);
                    }
                    answer = did;
                }
            }
        }
    }

    /// Run `visit` on from where it stopped; `answer` is what the prerequisite it last asked
    /// for returned.
    fn step(&mut self, visit: &mut Visit, answer: bool) -> Result<Next, Error> {
        let node = visit.node;
        loop {
            match visit.at {
                At::Start => {
                    if let Some(did) = self.start(visit)? {
                        return Ok(Next::Return(did));
                    }
                    visit.out_of_date = self.options.all;
                    visit.at = At::Prerequisite(0);
                }
                At::Prerequisite(index) => {
                    let Some(arc) = self.graph.nodes[node].arcs.get(index) else {
                        visit.at = At::Decide;
                        continue;
                    };
                    match arc.node {
                        Some(child) => {
                            visit.at = At::PrerequisiteDone(index);
                            return Ok(Next::Visit(Visit::new(child, Some((node, index)))));
                        }
                        None => {
                            if self.graph.nodes[node].time == 0 {
                                if visit.reason.is_none() {
                                    visit.reason = Some(index);
                                }
                                visit.out_of_date = true;
                            }
                            visit.at = At::Prerequisite(index + 1);
                        }
                    }
                }
                At::PrerequisiteDone(index) => {
                    visit.did = answer || visit.did;
                    self.weigh(visit, index)?;
                    visit.at = At::Prerequisite(index + 1);
                }
                At::Decide => {
                    if let Some(did) = self.decide(visit)? {
                        return Ok(Next::Return(did));
                    }
                    visit.at = At::Pretender(0);
                }
                At::Pretender(index) => {
                    // Out of date and we really do have to do something: rescan for pretenders.
                    let Some(arc) = self.graph.nodes[node].arcs.get(index) else {
                        visit.at = At::Recipe;
                        continue;
                    };
                    visit.at = At::Pretender(index + 1);
                    if let Some(child) = arc.node
                        && self.graph.nodes[child].flags & PRETENDING != 0
                    {
                        self.unpretend_for(node, child, visit.reason);
                        visit.at = At::PretenderDone(index);
                        return Ok(Next::Visit(Visit::new(child, Some((node, index)))));
                    }
                }
                At::PretenderDone(index) => {
                    visit.did = answer || visit.did;
                    visit.ready = false;
                    visit.at = At::Pretender(index + 1);
                }
                At::Recipe => {
                    if !visit.ready {
                        // mk's `return did || work(node, p, parc)`: try the node again from
                        // the start unless something was started.
                        if visit.did {
                            return Ok(Next::Return(true));
                        }
                        *visit = Visit::new(node, visit.parent);
                        continue;
                    }
                    return Ok(Next::Return(self.do_recipe(node)? || visit.did));
                }
            }
        }
    }

    /// The start of mk's `work()`, before the prerequisites: `Some(did)` when the node is
    /// settled without them.
    fn start(&mut self, visit: &Visit) -> Result<Option<bool>, Error> {
        let node = visit.node;
        let flags = self.graph.nodes[node].flags;
        if flags & BEING_MADE != 0 {
            return Ok(Some(false));
        }
        if flags & MADE != 0
            && flags & PRETENDING != 0
            && let Some((parent_node, parent_arc)) = visit.parent
            && self.out_of_date(parent_node, parent_arc, false)?
        {
            if self.options.explain {
                let text = format!(
                    "unpretending {}({}) because {} is out of date({})\n",
                    self.graph.nodes[node].name,
                    self.graph.nodes[node].time,
                    self.graph.nodes[parent_node].name,
                    self.graph.nodes[parent_node].time
                );
                self.print_direct(&text);
            }
            self.unpretend(node);
        }
        let flags = self.graph.nodes[node].flags;
        if flags & MADE != 0 {
            if flags & PRETENDING != 0 {
                self.graph.nodes[node].time = 0;
            } else {
                return Ok(Some(false));
            }
        }
        if self.graph.nodes[node].arcs.is_empty() {
            if self.graph.nodes[node].time == 0 {
                let error = Error::DontKnowHow {
                    target: self.graph.nodes[node].name.to_string(),
                    directory: current_directory(&self.mkfile.directory),
                };
                if self.options.keep_going {
                    self.graph.nodes[node].flags |= BEING_MADE;
                    self.run_errors += 1;
                    self.report.errors.push(error);
                } else {
                    return Err(error);
                }
            } else {
                self.graph.nodes[node].set_made(MADE);
            }
            return Ok(Some(false));
        }
        Ok(None)
    }

    /// After a prerequisite's visit: whether it is ready, and whether it makes the node out
    /// of date (the newest such prerequisite is the reason).
    fn weigh(&mut self, visit: &mut Visit, index: usize) -> Result<(), Error> {
        let node = visit.node;
        let Some(child) = self.graph.nodes[node].arcs[index].node else {
            return Ok(());
        };
        if self.graph.nodes[child].flags & (NOT_MADE | BEING_MADE) != 0 {
            visit.ready = false;
        }
        if self.out_of_date(node, index, false)? {
            visit.out_of_date = true;
            let replace = match visit.reason {
                None => true,
                Some(reason) => match self.graph.nodes[node].arcs[reason].node {
                    None => true,
                    Some(reason_node) => {
                        self.graph.nodes[reason_node].time < self.graph.nodes[child].time
                    }
                },
            };
            if replace {
                visit.reason = Some(index);
            }
        }
        Ok(())
    }

    /// After every prerequisite: `Some(did)` when the node waits, is up to date, or can
    /// pretend to be made; `None` when it must be made.
    fn decide(&mut self, visit: &Visit) -> Result<Option<bool>, Error> {
        let node = visit.node;
        if !visit.ready {
            return Ok(Some(visit.did));
        }
        if !visit.out_of_date {
            self.graph.nodes[node].set_made(MADE);
            return Ok(Some(visit.did));
        }
        // Can we pretend to be made? (A missing intermediate whose parent is up to date
        // with respect to what it would be made from need not be made.)
        let n = &self.graph.nodes[node];
        if !self.make_intermediates()
            && n.time == 0
            && n.flags & (PRETENDING | CAN_PRETEND) != 0
            && let Some((parent_node, _)) = visit.parent
            && let Some(reason) = visit.reason
            && self.graph.nodes[node].arcs[reason].node.is_some()
            && !self.out_of_date_arc(parent_node, node, reason)?
        {
            let n = &mut self.graph.nodes[node];
            n.flags &= !CAN_PRETEND;
            n.set_made(MADE);
            let first_time = n.flags & PRETENDING == 0;
            n.flags |= PRETENDING;
            if self.options.explain && first_time {
                let text = format!(
                    "pretending {} has time {}\n",
                    self.graph.nodes[node].name, self.graph.nodes[node].time
                );
                self.print_direct(&text);
            }
            return Ok(Some(visit.did));
        }
        Ok(None)
    }

    fn unpretend_for(&mut self, node: NodeId, child: NodeId, reason: Option<usize>) {
        if self.options.explain {
            let because = reason
                .and_then(|reason| self.graph.nodes[node].arcs[reason].node)
                .map_or("rule with no prerequisites".to_string(), |reason| {
                    self.graph.nodes[reason].name.to_string()
                });
            let text = format!(
                "unpretending {} because of {} because of {}\n",
                self.graph.nodes[child].name, self.graph.nodes[node].name, because
            );
            self.print(&text);
        }
        self.unpretend(child);
    }

    /// mk's `outofdate(parent, arc)` where the arc is given by index into the parent's arcs.
    fn out_of_date(&mut self, node: NodeId, arc: usize, eval: bool) -> Result<bool, Error> {
        let arc = &self.graph.nodes[node].arcs[arc];
        let Some(child) = arc.node else {
            return Ok(false);
        };
        let rule = arc.rule;
        self.compare(node, child, rule, eval)
    }

    /// `outofdate(p, ra)` where `ra` is an arc of `node` (not of `p`): mk passes the arc
    /// of the child, so the comparison is between `p` and the arc's prerequisite.
    fn out_of_date_arc(&mut self, parent: NodeId, node: NodeId, arc: usize) -> Result<bool, Error> {
        let arc = &self.graph.nodes[node].arcs[arc];
        let Some(child) = arc.node else {
            return Ok(false);
        };
        let rule = arc.rule;
        self.compare(parent, child, rule, false)
    }

    fn compare(
        &mut self,
        node: NodeId,
        child: NodeId,
        rule: usize,
        eval: bool,
    ) -> Result<bool, Error> {
        if let Some(program) = self.graph.rule(rule).attributes.program.clone() {
            let key = (
                self.graph.nodes[node].name.to_string(),
                self.graph.nodes[child].name.to_string(),
            );
            if !eval && let Some(&cached) = self.program_cache.get(&key) {
                return Ok(cached);
            }
            let mut argv = self.graph.rule(rule).shell.clone();
            argv.push("-c".to_string());
            argv.push(format!("{} '{}' '{}'\n", program, key.0, key.1));
            self.flush();
            let outcome = self
                .runner
                .run(&Command {
                    argv,
                    stdin: None,
                    environment: crate::process_environment(),
                    directory: self.mkfile.directory.clone(),
                    capture_stdout: false,
                    targets: Vec::new(),
                })
                .map_err(|source| Error::StartRecipe {
                    targets: key.0.clone(),
                    source,
                })?;
            let stale = !outcome.status.success();
            self.program_cache.insert(key, stale);
            return Ok(stale);
        }
        let (n, c) = (&self.graph.nodes[node], &self.graph.nodes[child]);
        if c.name.contains('(') && c.time == 0 {
            return Ok(true);
        }
        Ok(n.time <= c.time)
    }

    /// mk's `update()`: a recipe finished (or `fake`: failed under `-k`).
    fn update(&mut self, fake: bool, node: NodeId) -> Result<(), Error> {
        self.graph.nodes[node].set_made(if fake { BEING_MADE } else { MADE });
        let name = self.graph.nodes[node].name.to_string();
        if self.graph.nodes[node].flags & VIRTUAL == 0 && self.graph.exists(&name) {
            let time = self.graph.time_of(&name, true);
            self.print_notices();
            let time = time?;
            let n = &mut self.graph.nodes[node];
            n.time = time;
            n.flags &= !(CAN_PRETEND | PRETENDING);
            for index in 0..self.graph.nodes[node].arcs.len() {
                let arc = &self.graph.nodes[node].arcs[index];
                if arc.node.is_some() && self.graph.rule(arc.rule).attributes.program.is_some() {
                    self.out_of_date(node, index, true)?;
                }
            }
        } else {
            self.graph.nodes[node].time = 1;
            for index in 0..self.graph.nodes[node].arcs.len() {
                if let Some(child) = self.graph.nodes[node].arcs[index].node
                    && self.out_of_date(node, index, true)?
                {
                    self.graph.nodes[node].time = self.graph.nodes[child].time;
                }
            }
        }
        Ok(())
    }

    fn touch(&mut self, name: &str) -> Result<(), Error> {
        self.print(&format!("touch({name})\n"));
        if self.options.dry_run {
            return Ok(());
        }
        let touch_error = |source| Error::Touch {
            path: name.to_string(),
            source,
        };
        if let Some((archive, member)) = crate::archive::split(name) {
            let path = self.graph.path(archive);
            let known = crate::archive::member_dates(&path).contains_key(member);
            return crate::archive::touch_member(&path, member, known).map_err(touch_error);
        }
        let path = self.graph.path(name);
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(touch_error)?;
        file.set_modified(std::time::SystemTime::now())
            .map_err(touch_error)
    }

    fn do_recipe(&mut self, node: NodeId) -> Result<bool, Error> {
        let chosen = self.graph.nodes[node]
            .arcs
            .iter()
            .enumerate()
            .filter(|(_, arc)| !self.graph.rule(arc.rule).recipe.is_empty())
            .map(|(index, _)| index)
            .next_back();
        let Some(chosen) = chosen else {
            let flags = self.graph.nodes[node].flags;
            if flags & (VIRTUAL | NO_RECIPE) == 0 {
                return Err(Error::NoRecipe {
                    target: self.graph.nodes[node].name.to_string(),
                });
            }
            let name = self.graph.nodes[node].name.to_string();
            if name.contains('(') && self.graph.nodes[node].time == 0 {
                self.graph.nodes[node].set_made(MADE);
            } else {
                self.update(false, node)?;
            }
            if self.options.touch {
                if flags & VIRTUAL == 0 {
                    self.touch(&name)?;
                } else if self.options.explain {
                    self.print(&format!("no touch of virtual '{name}'\n"));
                }
            }
            return Ok(false);
        };
        let arc = self.graph.nodes[node].arcs[chosen].clone();
        let rule = self.graph.rule(arc.rule).clone();
        self.graph.nodes[node].next = None;
        let mut targets = Vec::new();
        let mut all_targets = Vec::new();
        let mut chain = vec![node];
        if rule.attributes.regex {
            targets.push(self.graph.nodes[node].name.to_string());
            all_targets.push(self.graph.nodes[node].name.to_string());
        } else {
            for word in &rule.targets {
                let name = if rule.is_meta {
                    crate::expand::substitute_stem(&arc.stem, word)
                } else {
                    word.clone()
                };
                all_targets.push(name.clone());
                let Some(&other) = self.graph.by_name.get(name.as_str()) else {
                    continue;
                };
                if !self.options.all && self.graph.nodes[other].time != 0 {
                    let mut stale = false;
                    for index in 0..self.graph.nodes[other].arcs.len() {
                        if self.graph.nodes[other].arcs[index].node.is_some()
                            && self.out_of_date(other, index, false)?
                        {
                            stale = true;
                            break;
                        }
                    }
                    if !stale {
                        continue;
                    }
                }
                targets.push(name);
                if other == node {
                    continue;
                }
                self.graph.nodes[other].next = self.graph.nodes[node].next;
                self.graph.nodes[node].next = Some(other);
                if !chain.contains(&other) {
                    chain.insert(1, other);
                }
            }
        }
        if chain
            .iter()
            .any(|&n| self.graph.nodes[n].flags & READY == 0)
        {
            return Ok(false);
        }
        let mut prereqs: Vec<String> = Vec::new();
        let mut new_prereqs: Vec<String> = Vec::new();
        // mk de-duplicates with a linear scan; a set keeps 10,000 prerequisites linear.
        let mut seen_prereqs = std::collections::HashSet::new();
        let mut seen_new = std::collections::HashSet::new();
        for &n in &chain {
            for index in 0..self.graph.nodes[n].arcs.len() {
                match self.graph.nodes[n].arcs[index].node {
                    Some(child) => {
                        let name = self.graph.nodes[child].name.to_string();
                        if seen_prereqs.insert(child) {
                            prereqs.push(name.clone());
                        }
                        if self.out_of_date(n, index, false)? {
                            if self.options.explain {
                                let text = format!(
                                    "{}({}) < {}({})\n",
                                    self.graph.nodes[n].name,
                                    self.graph.nodes[n].time,
                                    name,
                                    self.graph.nodes[child].time
                                );
                                self.print_direct(&text);
                            }
                            if seen_new.insert(child) {
                                new_prereqs.push(name);
                            }
                        }
                    }
                    None => {
                        if self.options.explain {
                            let text =
                                format!("{} has no prerequisites\n", self.graph.nodes[n].name);
                            self.print_direct(&text);
                        }
                    }
                }
            }
            self.graph.nodes[n].set_made(BEING_MADE);
        }
        let stem = if rule.attributes.regex {
            String::new()
        } else {
            arc.stem.clone()
        };
        let mut internal: Vec<(&str, Vec<String>)> = vec![
            ("target", targets.clone()),
            ("stem", vec![stem.clone()]),
            ("prereq", prereqs.clone()),
            ("pid", vec![std::process::id().to_string()]),
            ("nproc", vec![String::new()]),
            ("newprereq", new_prereqs.clone()),
            ("alltarget", all_targets.clone()),
            ("newmember", archive_members(&new_prereqs)),
        ];
        for (group, name) in STEMS.iter().enumerate() {
            let value = if rule.attributes.regex {
                arc.matches
                    .get(group)
                    .cloned()
                    .flatten()
                    .unwrap_or_default()
            } else {
                String::new()
            };
            internal.push((name, vec![value]));
        }
        let job = Job {
            targets,
            all_targets,
            prereqs,
            new_prereqs,
            stem,
            recipe: rule.recipe.clone(),
            echo: String::new(),
            quiet: rule.attributes.quiet,
            rule: format!("{}:{}", rule.file, rule.line),
        };
        self.queue.push_back(PendingJob {
            rule: arc.rule,
            nodes: chain,
            job,
            internal,
        });
        if self.running < self.limit {
            self.schedule()?;
        }
        Ok(true)
    }

    fn echo(
        &self,
        recipe: &str,
        internal: &[(&'static str, Vec<String>)],
        quoting: Quoting,
    ) -> String {
        let variables = &self.mkfile.variables;
        let lookup = |name: &str| -> Option<String> {
            if let Some((_, value)) = internal.iter().find(|(key, _)| *key == name) {
                return Some(value.join(" "));
            }
            // Only variables mk set and exports are expanded; the rest is the shell's.
            if !variables.is_assigned(name) || !variables.is_exported(name) {
                return None;
            }
            variables.get(name).map(|words| words.join(" "))
        };
        echo_text_with(recipe, &lookup, quoting)
    }

    /// mk's `sched()`: start the next queued job.
    fn schedule(&mut self) -> Result<(), Error> {
        let Some(mut pending) = self.queue.pop_front() else {
            return Ok(());
        };
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        if let Some(entry) = pending.internal.iter_mut().find(|(k, _)| *k == "nproc") {
            entry.1 = vec![slot.to_string()];
        }
        let rule = self.graph.rule(pending.rule).clone();
        let echo = self.echo(
            &pending.job.recipe,
            &pending.internal,
            Quoting::of_shell(&rule.shell),
        );
        pending.job.echo = echo.clone();
        if !self.options.touch && (self.options.dry_run || !rule.attributes.quiet) {
            self.print(&echo);
        }
        self.report.jobs.push(pending.job.clone());
        if self.options.dry_run || self.options.touch {
            for &n in &pending.nodes {
                if self.options.touch {
                    let name = self.graph.nodes[n].name.to_string();
                    if self.graph.nodes[n].flags & VIRTUAL == 0 {
                        self.touch(&name)?;
                    } else if self.options.explain {
                        self.print(&format!("no touch of virtual '{name}'\n"));
                    }
                }
                self.graph.nodes[n].time = now();
                self.graph.nodes[n].set_made(MADE);
            }
            return Ok(());
        }
        self.flush();
        let mut argv = rule.shell.clone();
        if !rule.attributes.continue_on_error {
            argv.push("-e".to_string());
        }
        // rc takes lists in the environment separated by \x01; sh gets blanks.
        let separator = if is_rc(&rule.shell) { "\x01" } else { " " };
        let mut environment: Vec<(String, String)> = self
            .base_environment
            .iter()
            .map(|(name, words)| (name.clone(), words.join(separator)))
            .collect();
        environment.extend(
            pending
                .internal
                .into_iter()
                .map(|(name, words)| (name.to_string(), words.join(separator))),
        );
        let command = Command {
            argv,
            stdin: Some(pending.job.recipe.clone()),
            environment,
            directory: self.mkfile.directory.clone(),
            capture_stdout: false,
            targets: pending.job.targets.clone(),
        };
        self.slots[slot] = Some(Running {
            targets: pending.job.targets,
            nodes: pending.nodes,
            echo,
        });
        self.running += 1;
        (self.spawn)(slot, command);
        Ok(())
    }

    /// mk's `waitup()`: wait for one recipe. Returns true when nothing was running.
    fn wait_one(&mut self) -> Result<bool, Error> {
        if self.running == 0 {
            if self.queue.is_empty() {
                return Ok(true);
            }
            self.schedule()?;
            return Ok(false);
        }
        let Ok((slot, result)) = self.receiver.recv() else {
            return Ok(true);
        };
        self.running -= 1;
        let Some(running) = self.slots[slot].take() else {
            return Ok(false);
        };
        let mut fake = false;
        let failure = match result {
            Err(source) => Some(Error::StartRecipe {
                targets: running.targets.join(" "),
                source,
            }),
            Ok(outcome) if !outcome.status.success() => {
                let mut deleted = Vec::new();
                for &n in &running.nodes {
                    if self.graph.nodes[n].flags & DELETE != 0 {
                        let name = self.graph.nodes[n].name.to_string();
                        if let Err(error) = std::fs::remove_file(self.graph.path(&name)) {
                            self.report.warnings.push(Warning {
                                message: format!("cannot remove `{name}`: {error}"),
                                location: None,
                            });
                        }
                        deleted.push(name);
                    }
                }
                Some(Error::RecipeFailed {
                    targets: running.targets.join(" "),
                    recipe: front(&running.echo),
                    status: outcome.status.describe(),
                    deleted,
                })
            }
            Ok(_) => None,
        };
        if let Some(error) = failure {
            if self.options.keep_going {
                self.run_errors += 1;
                self.report.errors.push(error);
                fake = true;
            } else {
                self.queue.clear();
                return Err(error);
            }
        }
        for target in &running.targets {
            if let Some(&node) = self.graph.by_name.get(target.as_str()) {
                self.update(fake, node)?;
            }
        }
        if self.running < self.limit {
            self.schedule()?;
        }
        Ok(false)
    }

    /// Wait for every running recipe (mk does before it exits, even on error).
    fn drain(&mut self) {
        self.queue.clear();
        while self.running > 0 {
            let Ok((slot, _)) = self.receiver.recv() else {
                return;
            };
            self.running -= 1;
            self.slots[slot] = None;
        }
    }
}

/// One call of mk's `work()` on the planner's stack: the node, the arc it was reached by,
/// and the locals mk's `work()` keeps between its recursive calls.
struct Visit {
    node: NodeId,
    parent: Option<(NodeId, usize)>,
    did: bool,
    ready: bool,
    out_of_date: bool,
    /// The arc that makes the node out of date (mk's `ra`).
    reason: Option<usize>,
    at: At,
}

impl Visit {
    fn new(node: NodeId, parent: Option<(NodeId, usize)>) -> Self {
        Visit {
            node,
            parent,
            did: false,
            ready: true,
            out_of_date: false,
            reason: None,
            at: At::Start,
        }
    }
}

/// Where a [`Visit`] stands in mk's `work()`.
#[derive(Debug, Clone, Copy)]
enum At {
    Start,
    /// About to visit the prerequisite of this arc, or (`Done`) just back from it.
    Prerequisite(usize),
    PrerequisiteDone(usize),
    /// Every prerequisite visited: waiting, up to date, pretending, or to be made.
    Decide,
    /// To be made: whether this arc's prerequisite only pretends to be made.
    Pretender(usize),
    PretenderDone(usize),
    Recipe,
}

/// What a [`Visit`] needs next.
enum Next {
    Visit(Visit),
    Return(bool),
}

/// libbio's buffer size (`Bsize`): 9base's standard output is written in blocks this big.
const OUTPUT_BUFFER: usize = 8192;

const STEMS: [&str; 10] = [
    "stem0", "stem1", "stem2", "stem3", "stem4", "stem5", "stem6", "stem7", "stem8", "stem9",
];

/// `$newmember`: the `member` of each `archive(member)` prerequisite.
fn archive_members(prereqs: &[String]) -> Vec<String> {
    prereqs
        .iter()
        .filter_map(|word| {
            let open = word.find('(')?;
            let close = word[open + 1..].find(')')? + open + 1;
            Some(word[open + 1..close].to_string())
        })
        .collect()
}

/// mk's `front()`: a recipe shortened to its first three words, `...` and the last.
fn front(recipe: &str) -> String {
    let fields: Vec<&str> = recipe.split([' ', '\t', '\n']).collect();
    let fields: Vec<&str> = if fields.len() > 5 {
        vec![
            fields[0],
            fields[1],
            fields[2],
            "...",
            fields[fields.len() - 1],
        ]
    } else {
        fields
    };
    fields.join(" ").trim().to_string()
}

/// Whether a shell command is Plan 9's rc (lists are exported differently).
fn is_rc(shell: &[String]) -> bool {
    Quoting::of_shell(shell) == Quoting::Rc
}

/// The most jobs 9base can keep: it sizes its job table as `NPROC` times 16 bytes in a C
/// `int`, and a larger table overflows and fails (`mk: cannot alloc`, exit 1).
const MOST_JOBS: i32 = i32::MAX / 16;

/// `NPROC` read as 9base reads it: C's `atoi` (leading blanks, a sign, digits, the rest
/// ignored; a number past `long` saturates) truncated to a 32-bit `int`, and at least 1.
/// What 9base cannot run with is an error rather than a huge allocation.
fn nproc_limit(word: &str) -> Result<usize, Error> {
    let trimmed = word.trim_start();
    let (negative, digits) = match trimmed.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, trimmed.strip_prefix('+').unwrap_or(trimmed)),
    };
    let mut number: i64 = 0;
    for digit in digits.chars().map_while(|c| c.to_digit(10)) {
        number = number.saturating_mul(10).saturating_add(i64::from(digit));
    }
    if negative {
        number = -number;
    }
    // 9base keeps NPROC in a C int: the truncation is what decides its behaviour.
    let limit = number as i32;
    if limit > MOST_JOBS {
        return Err(Error::BadNproc {
            value: word.to_string(),
            most: MOST_JOBS,
        });
    }
    Ok(usize::try_from(limit.max(1)).unwrap_or(1))
}

fn current_directory(directory: &std::path::Path) -> String {
    std::fs::canonicalize(directory)
        .unwrap_or_else(|_| directory.to_path_buf())
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nproc_limit_table() {
        let cases: &[(&str, Option<usize>)] = &[
            ("4", Some(4)),
            ("4x", Some(4)),
            (" +3", Some(3)),
            ("abc", Some(1)),
            ("-5", Some(1)),
            ("0", Some(1)),
            ("30000000", Some(30_000_000)),
            ("134217727", Some(134_217_727)),
            ("134217728", None),
            ("2147483647", None),
            ("99999999999", None),
            ("3000000000", Some(1)),
            ("999999999999999999", Some(1)),
            ("99999999999999999999999", Some(1)),
        ];
        for (word, expected) in cases {
            assert_eq!(nproc_limit(word).ok(), *expected, "NPROC={word}");
        }
    }
}
