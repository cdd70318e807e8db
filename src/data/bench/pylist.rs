//! MMMU's `options` column: the `str()` of a Python list of strings, such as
//! `['Right Atrium', "Murphy's sign", 'a\\b']`. Parsed as `ast.literal_eval` would parse such
//! a list and nothing more: string literals (single or double quoted, with Python's escapes)
//! separated by commas, an optional trailing comma, whitespace. Anything else (names, calls,
//! numbers, nested lists) is refused; nothing is evaluated.

/// The strings of a Python list literal, or why the text is not one.
pub(super) fn parse_str_list(text: &str) -> Result<Vec<String>, String> {
    let mut p = Parser {
        chars: text.chars().collect(),
        at: 0,
    };
    p.space();
    p.expect('[')?;
    let mut out = Vec::new();
    loop {
        p.space();
        match p.peek() {
            Some(']') => {
                p.at += 1;
                break;
            }
            Some('\'') | Some('"') => out.push(p.string()?),
            Some(c) => return Err(format!("{c:?} at {} where a string belongs", p.at)),
            None => return Err("the list is not closed".into()),
        }
        p.space();
        match p.peek() {
            Some(',') => p.at += 1,
            Some(']') => {}
            Some(c) => return Err(format!("{c:?} at {} where ',' or ']' belongs", p.at)),
            None => return Err("the list is not closed".into()),
        }
    }
    p.space();
    if p.at != p.chars.len() {
        return Err(format!("text after the list at {}", p.at));
    }
    Ok(out)
}

struct Parser {
    chars: Vec<char>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.at += 1;
        }
    }

    fn expect(&mut self, c: char) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.at += 1;
            Ok(())
        } else {
            Err(format!("expected {c:?} at {}", self.at))
        }
    }

    fn hex(&mut self, n: usize) -> Result<char, String> {
        let digits: String = self.chars.iter().skip(self.at).take(n).collect();
        if digits.chars().count() != n || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("bad \\x, \\u or \\U escape at {}", self.at));
        }
        self.at += n;
        let v = u32::from_str_radix(&digits, 16).map_err(|e| e.to_string())?;
        char::from_u32(v).ok_or_else(|| format!("escape U+{v:X} is not a character"))
    }

    /// A single- or double-quoted string literal, the quote at `at`.
    fn string(&mut self) -> Result<String, String> {
        let quote = self.chars[self.at];
        self.at += 1;
        let mut s = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err("a string is not closed".into());
            };
            self.at += 1;
            match c {
                c if c == quote => return Ok(s),
                '\n' => return Err("a line break inside a string".into()),
                '\\' => {
                    let Some(e) = self.peek() else {
                        return Err("a string is not closed".into());
                    };
                    self.at += 1;
                    match e {
                        '\n' => {}
                        '\\' | '\'' | '"' => s.push(e),
                        'n' => s.push('\n'),
                        't' => s.push('\t'),
                        'r' => s.push('\r'),
                        'a' => s.push('\x07'),
                        'b' => s.push('\x08'),
                        'f' => s.push('\x0c'),
                        'v' => s.push('\x0b'),
                        'x' => s.push(self.hex(2)?),
                        'u' => s.push(self.hex(4)?),
                        'U' => s.push(self.hex(8)?),
                        '0'..='7' => {
                            let mut v = e.to_digit(8).unwrap_or(0);
                            for _ in 0..2 {
                                match self.peek().and_then(|d| d.to_digit(8)) {
                                    Some(d) => {
                                        v = v * 8 + d;
                                        self.at += 1;
                                    }
                                    None => break,
                                }
                            }
                            s.push(char::from_u32(v).unwrap_or('\u{fffd}'));
                        }
                        'N' => return Err("\\N{...} escapes are not supported".into()),
                        // Python keeps an unknown escape as written.
                        other => {
                            s.push('\\');
                            s.push(other);
                        }
                    }
                }
                c => s.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_str_list;

    #[test]
    fn python_list_reprs() {
        assert_eq!(parse_str_list("[]"), Ok(vec![]));
        assert_eq!(
            parse_str_list(r#"['Right Atrium', "Murphy's sign", 'a\\b', 'x\'y', '\u00e9\n',]"#),
            Ok(vec![
                "Right Atrium".to_string(),
                "Murphy's sign".into(),
                "a\\b".into(),
                "x'y".into(),
                "é\n".into()
            ])
        );
        assert_eq!(parse_str_list(r"['\d']"), Ok(vec!["\\d".to_string()]));
        for bad in [
            "['x', __import__('os')]",
            "['x'] + ['y']",
            "[1, 2]",
            "['x'",
            "'x'",
            "[['x']]",
            "['x' 'y']",
            "",
        ] {
            assert!(parse_str_list(bad).is_err(), "{bad}");
        }
    }
}
