//! Archive members (`lib.a(member.o)`): their dates are read from the `ar` file, as mk(1)
//! says, so `$newmember` lists only the members older than their files.
//!
//! The `ar` format is read here rather than with a crate: it is 8 bytes of magic and then
//! 60-byte headers with a decimal date, and mk must read it as 9base does — a date of 0
//! counts as 1, a short or damaged archive keeps the members read so far and is not an
//! error, and BSD (`#1/len`) and GNU (`//` table, `/offset`) long names are both understood.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// The magic string every `ar` file starts with.
pub(crate) const MAGIC: &[u8; 8] = b"!<arch>\n";

/// `ar(member)` split at the parentheses: the archive and the member (to the `)`).
pub(crate) fn split(name: &str) -> Option<(&str, &str)> {
    let (archive, rest) = name.split_once('(')?;
    let member = rest.split_once(')').map_or(rest, |(member, _)| member);
    Some((archive, member))
}

/// What kind of file an archive name points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// It does not exist (yet): mk assumes it will be an archive.
    Missing,
    Archive,
    /// It exists and does not start with the `ar` magic.
    NotAnArchive,
}

pub(crate) fn kind(path: &Path) -> Kind {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Kind::Missing;
    };
    let mut magic = [0u8; 8];
    match file.read_exact(&mut magic) {
        Ok(()) if &magic == MAGIC => Kind::Archive,
        _ => Kind::NotAnArchive,
    }
}

/// The date of each member of the archive at `path`, by member name. An archive that cannot
/// be read gives what was read before the problem.
pub(crate) fn member_dates(path: &Path) -> HashMap<String, u64> {
    let mut dates = HashMap::new();
    if let Ok(file) = std::fs::File::open(path) {
        let _ = read_members(std::io::BufReader::new(file), &mut dates);
    }
    dates
}

fn read_members<R: Read + Seek>(
    mut input: R,
    dates: &mut HashMap<String, u64>,
) -> std::io::Result<()> {
    let mut magic = [0u8; 8];
    input.read_exact(&mut magic)?;
    let mut long_names: Option<Vec<u8>> = None;
    let mut header = [0u8; 60];
    while input.read_exact(&mut header).is_ok() {
        let name_field = &header[0..16];
        let date = match decimal(&header[16..28]) {
            0 => 1,
            date => date,
        };
        let mut size = decimal(&header[48..58]);
        size += size & 1;
        let mut name_length = 0;
        let name = if let Some(length) = name_field.strip_prefix(b"#1/") {
            // BSD: the name follows the header and counts in the size.
            name_length = decimal(length);
            let mut name = vec![0u8; usize::try_from(name_length).unwrap_or(0)];
            input.read_exact(&mut name)?;
            Some(trim_nul(&name))
        } else if name_field.starts_with(b"// ") {
            // GNU: the table of long names.
            let mut table = vec![0u8; usize::try_from(size).unwrap_or(0)];
            input.read_exact(&mut table)?;
            long_names = Some(table);
            continue;
        } else if let (Some(table), Some(offset)) = (&long_names, gnu_offset(name_field)) {
            table.get(offset..).map(|rest| {
                let end = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
                String::from_utf8_lossy(&rest[..end]).into_owned()
            })
        } else {
            let mut end = name_field
                .iter()
                .rposition(|&b| b != b' ')
                .map_or(1, |last| last + 1);
            // System V ends names with `/`.
            if name_field[end - 1] == b'/' {
                end -= 1;
            }
            Some(trim_nul(&name_field[..end]))
        };
        if let Some(name) = name {
            dates.insert(name, date);
        }
        let skip = i64::try_from(size.saturating_sub(name_length)).unwrap_or(i64::MAX);
        input.seek(SeekFrom::Current(skip))?;
    }
    Ok(())
}

/// `-t` on `archive(member)`, as 9base's `atouch`: a missing archive is created (its magic
/// alone); when the member was read from the archive (`known`), the header whose name field,
/// trailing blanks dropped, is exactly `member` gets the current date. GNU `ar` ends names
/// with `/`, which that comparison keeps, so 9base leaves such headers alone — and so does
/// this.
pub(crate) fn touch_member(path: &Path, member: &str, known: bool) -> std::io::Result<()> {
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut file = std::fs::File::create(path)?;
            file.write_all(MAGIC)?;
            file
        }
        Err(error) => return Err(error),
    };
    if !known {
        return Ok(());
    }
    file.seek(SeekFrom::Start(MAGIC.len() as u64))?;
    let mut header = [0u8; 60];
    while file.read_exact(&mut header).is_ok() {
        // 9base: blanks dropped from the end, never the first byte; then a C string.
        let last = (1..16).rev().find(|&i| header[i] != b' ').unwrap_or(0);
        let name = &header[..=last];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        if name == member.as_bytes() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_secs());
            file.seek(SeekFrom::Current(16 - 60))?;
            file.write_all(format!("{now:<12}").as_bytes())?;
            break;
        }
        let mut size = decimal(&header[48..58]);
        size += size & 1;
        file.seek(SeekFrom::Current(i64::try_from(size).unwrap_or(i64::MAX)))?;
    }
    Ok(())
}

/// `/123 `: an offset into the GNU long-name table.
fn gnu_offset(field: &[u8]) -> Option<usize> {
    let digits = field.strip_prefix(b"/")?;
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    if end == 0 || digits[end] != b' ' {
        return None;
    }
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// C's `atol` on a header field: leading blanks, then digits.
fn decimal(field: &[u8]) -> u64 {
    field
        .iter()
        .skip_while(|&&b| b == b' ')
        .take_while(|b| b.is_ascii_digit())
        .fold(0u64, |number, &digit| {
            number
                .saturating_mul(10)
                .saturating_add(u64::from(digit - b'0'))
        })
}

fn trim_nul(name: &[u8]) -> String {
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, date: u64, size: usize) -> Vec<u8> {
        let text = format!("{name:<16}{date:<12}0     0     100644  {size:<10}`\n");
        assert_eq!(text.len(), 60);
        text.into_bytes()
    }

    #[test]
    fn reads_member_dates() {
        let mut archive = MAGIC.to_vec();
        archive.extend(header("/", 0, 4));
        archive.extend(b"\0\0\0\0");
        archive.extend(header("//", 0, 22));
        archive.extend(b"a_rather_long_name.o/\n");
        archive.extend(header("a.o/", 1000, 3));
        archive.extend(b"abc\n");
        archive.extend(header("#1/8", 2000, 9));
        archive.extend(b"bsd.o\0\0\0x\n");
        archive.extend(header("/0", 0, 2));
        archive.extend(b"zz");
        archive.extend(header("short.o", 7, 100));
        let mut dates = HashMap::new();
        let result = read_members(std::io::Cursor::new(archive), &mut dates);
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(dates.get("a.o"), Some(&1000));
        assert_eq!(dates.get("bsd.o"), Some(&2000));
        assert_eq!(dates.get("a_rather_long_name.o"), Some(&1));
        assert_eq!(dates.get("short.o"), Some(&7));
    }

    #[test]
    fn touching_a_member_rewrites_only_its_date_as_9base_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lib.a");
        let mut archive = MAGIC.to_vec();
        archive.extend(header("a.o", 1000, 2));
        archive.extend(b"a\n");
        archive.extend(header("b.o/", 1000, 3));
        archive.extend(b"bb\n\n");
        std::fs::write(&path, &archive).expect("write");

        touch_member(&path, "a.o", true).expect("touch");
        let touched = std::fs::read(&path).expect("read");
        let date = decimal(&touched[8 + 16..8 + 28]);
        assert!(date > 1_700_000_000, "now, not {date}");
        assert_eq!(
            touched[8 + 28..],
            archive[8 + 28..],
            "only the date changed"
        );

        // A GNU name keeps its `/` in 9base's comparison: left alone.
        let before = std::fs::read(&path).expect("read");
        touch_member(&path, "b.o", true).expect("touch");
        assert_eq!(std::fs::read(&path).expect("read"), before);

        let missing = dir.path().join("new.a");
        touch_member(&missing, "x.o", false).expect("create");
        assert_eq!(std::fs::read(&missing).expect("read"), MAGIC);
    }

    #[test]
    fn split_table() {
        assert_eq!(split("lib.a(x.o)"), Some(("lib.a", "x.o")));
        assert_eq!(split("lib.a(x.o"), Some(("lib.a", "x.o")));
        assert_eq!(split("lib.a"), None);
    }
}
