//! The escapes of a JSON string read a byte at a time, for the two streaming scanners that
//! read JSON without parsing it (`limit`'s model finder and `tokens`' usage scanner): what
//! follows a backslash, across reads.

/// Where a string reader is in an escape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Escape {
    /// Not in one.
    None,
    /// Just after the backslash.
    Backslash,
    /// In `\uXXXX`: how many hex digits were read, and their value so far.
    Hex(u8, u16),
}

/// What one byte inside an escape gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unescaped {
    /// The escape goes on.
    More,
    /// A one-byte escape (`\"`, `\n` …) stands for this byte.
    Byte(u8),
    /// `\uXXXX` stands for this UTF-16 code unit (surrogates are the reader's to pair).
    Unit(u16),
    /// Not an escape JSON allows.
    Bad,
}

impl Escape {
    /// Takes `b`, the byte after a backslash or one of the hex digits after `\u`; `self` is
    /// [`Escape::Backslash`] or [`Escape::Hex`], and is [`Escape::None`] again once the
    /// escape is complete or bad.
    pub(crate) fn step(&mut self, b: u8) -> Unescaped {
        match *self {
            Escape::None => {
                debug_assert!(false, "Escape::step outside an escape");
                Unescaped::Bad
            }
            Escape::Backslash => {
                *self = Escape::None;
                Unescaped::Byte(match b {
                    b'"' | b'\\' | b'/' => b,
                    b'b' => 0x08,
                    b'f' => 0x0C,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'u' => {
                        *self = Escape::Hex(0, 0);
                        return Unescaped::More;
                    }
                    _ => return Unescaped::Bad,
                })
            }
            Escape::Hex(n, acc) => {
                let Some(d) = (b as char).to_digit(16) else {
                    *self = Escape::None;
                    return Unescaped::Bad;
                };
                let acc = acc << 4 | d as u16;
                if n == 3 {
                    *self = Escape::None;
                    Unescaped::Unit(acc)
                } else {
                    *self = Escape::Hex(n + 1, acc);
                    Unescaped::More
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(after_backslash: &[u8]) -> Vec<Unescaped> {
        let mut e = Escape::Backslash;
        after_backslash.iter().map(|&b| e.step(b)).collect()
    }

    #[test]
    fn every_escape_json_allows_and_none_other() {
        for (b, plain) in [
            (b'"', b'"'),
            (b'\\', b'\\'),
            (b'/', b'/'),
            (b'b', 8),
            (b'f', 12),
            (b'n', b'\n'),
            (b'r', b'\r'),
            (b't', b'\t'),
        ] {
            assert_eq!(run(&[b]), [Unescaped::Byte(plain)]);
        }
        for b in [b'a', b'U', b'0', b'x', b' ', 0xFF] {
            assert_eq!(run(&[b]), [Unescaped::Bad], "{b}");
        }
        use Unescaped::{Bad, More, Unit};
        assert_eq!(run(b"u00e9"), [More, More, More, More, Unit(0xE9)]);
        assert_eq!(run(b"uD83D"), [More, More, More, More, Unit(0xD83D)]);
        assert_eq!(run(b"uFfFf"), [More, More, More, More, Unit(0xFFFF)]);
        assert_eq!(run(b"u12g"), [More, More, More, Bad]);
    }

    #[test]
    fn a_complete_escape_leaves_the_reader_outside_one() {
        let mut e = Escape::Backslash;
        e.step(b'n');
        assert_eq!(e, Escape::None);
        let mut e = Escape::Backslash;
        for &b in b"u0041" {
            e.step(b);
        }
        assert_eq!(e, Escape::None);
        let mut e = Escape::Backslash;
        e.step(b'q');
        assert_eq!(e, Escape::None);
    }
}
