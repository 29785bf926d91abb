//! Looks at YAML text around serde_yaml's parse: a cheap, linear pre-scan
//! refuses deep nesting before serde_yaml parses it (a 200 KB deeply nested
//! file otherwise costs seconds of CPU on every `check` and reload), and
//! after serde_yaml refused a second document without saying where, a
//! bisection finds where it starts.
//!
//! The pre-scan counts block levels (indentation steps and `- ` sequence
//! entries) plus open flow collections (`[`, `{`), skipping quoted strings,
//! comments and block scalars. It over-approximates slightly (a continued plain scalar
//! counts one level), which a limit far above any real config absorbs.

/// Deepest nesting accepted; apilb's own schema needs six.
pub const MAX_YAML_DEPTH: usize = 64;

/// Scan state carried across lines.
#[derive(Default)]
struct Scan {
    /// Indentation of each open block level.
    indents: Vec<usize>,
    /// Open flow collections.
    flow: usize,
    /// The quote character of a string still open at the end of a line.
    quote: Option<u8>,
    /// Inside a block scalar (`|`, `>`) introduced at this indentation.
    block_scalar: Option<usize>,
}

/// Refuses text nested deeper than [`MAX_YAML_DEPTH`], naming where.
pub(super) fn check(text: &str) -> Result<(), String> {
    let mut s = Scan::default();
    for (n, line) in text.lines().enumerate() {
        s.line(line.as_bytes()).map_err(|col| {
            format!(
                "nesting deeper than {MAX_YAML_DEPTH} levels at line {} column {}",
                n + 1,
                col + 1
            )
        })?;
    }
    Ok(())
}

/// Where a second YAML document starts (line, column; 1-based): the first
/// line that, read with every line before it, makes the text hold a complete
/// document and the start of another. Found by bisection over line counts, so
/// a long file costs a few parses, only on this error path.
pub(super) fn second_document(text: &str) -> Option<(usize, usize)> {
    use serde::Deserialize;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let ends: Vec<usize> = lines
        .iter()
        .scan(0, |end, l| {
            *end += l.len();
            Some(*end)
        })
        .collect();
    let two = |k: usize| {
        let mut docs = serde_yaml::Deserializer::from_str(&text[..ends[k - 1]]);
        docs.next()
            .is_some_and(|d| serde::de::IgnoredAny::deserialize(d).is_ok())
            && docs.next().is_some()
    };
    let (mut lo, mut hi) = (1, lines.len());
    if !two(hi) {
        return None;
    }
    while lo < hi {
        let mid = (lo + hi) / 2;
        if two(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let line = lines[lo - 1];
    Some((lo, line.len() - line.trim_start().len() + 1))
}

impl Scan {
    /// Scans one line; `Err(column)` where the limit is crossed.
    fn line(&mut self, b: &[u8]) -> Result<(), usize> {
        let indent = b.iter().take_while(|&&c| c == b' ').count();
        let blank = b[indent..].iter().all(|c| c.is_ascii_whitespace());
        if let Some(p) = self.block_scalar {
            if blank || indent > p {
                return Ok(());
            }
            self.block_scalar = None;
        }
        let mut i = 0;
        if self.quote.is_none() && self.flow == 0 {
            if blank || b[indent] == b'#' {
                return Ok(());
            }
            while self.indents.last().is_some_and(|&l| l > indent) {
                self.indents.pop();
            }
            if self.indents.last().is_none_or(|&l| l < indent) {
                self.indents.push(indent);
            }
            i = indent;
            // Each `- ` opens a sequence entry one level deeper.
            while b.get(i) == Some(&b'-') && b.get(i + 1).is_none_or(|c| *c == b' ') {
                i += 2;
                self.indents.push(i);
            }
            self.limit(i)?;
        }
        self.inline(b, i)?;
        if self.quote.is_none() && self.flow == 0 && ends_block_scalar(b) {
            self.block_scalar = Some(indent);
        }
        Ok(())
    }

    /// Flow brackets, quotes and comments from `start` to the line's end.
    fn inline(&mut self, b: &[u8], start: usize) -> Result<(), usize> {
        let mut i = start;
        while i < b.len() {
            let c = b[i];
            if let Some(q) = self.quote {
                if q == b'"' && c == b'\\' {
                    i += 1;
                } else if c == q {
                    self.quote = None;
                }
                i += 1;
                continue;
            }
            let after_sep = i == 0 || matches!(b[i - 1], b' ' | b'\t' | b'[' | b'{' | b',' | b':');
            match c {
                b'#' if after_sep => return Ok(()),
                b'"' | b'\'' if after_sep => self.quote = Some(c),
                b'[' | b'{' => {
                    self.flow += 1;
                    self.limit(i)?;
                }
                b']' | b'}' => self.flow = self.flow.saturating_sub(1),
                _ => {}
            }
            i += 1;
        }
        Ok(())
    }

    fn limit(&self, col: usize) -> Result<(), usize> {
        if self.indents.len() + self.flow > MAX_YAML_DEPTH {
            return Err(col);
        }
        Ok(())
    }
}

/// Whether a line ends with a block scalar indicator (`key: |`, `- >-`).
fn ends_block_scalar(b: &[u8]) -> bool {
    let text = String::from_utf8_lossy(b);
    let code = match text.find(" #") {
        Some(p) => &text[..p],
        None => &text,
    };
    let last = code.trim_end().rsplit([' ', '\t']).next().unwrap_or("");
    let mut chars = last.chars();
    matches!(chars.next(), Some('|' | '>'))
        && chars.all(|c| matches!(c, '-' | '+' | '1'..='9'))
        && code.trim_end().len() > last.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_configs_pass() {
        let text = "frontends:\n  - name: f # c\n    listen: '127.0.0.1:0'\n    strip_headers: [x-a, \"x-b\"]\npools:\n  - name: p\n    servers:\n      - 127.0.0.1:1\n    health:\n      tls:\n        server_name: it's\nnote: |\n  [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n";
        check(text).unwrap();
    }

    #[test]
    fn a_second_document_is_found_where_it_starts() {
        assert_eq!(second_document("---\na: 1\n# c\n"), None);
        assert_eq!(second_document("a: 1\n---\nb: 2\n"), Some((2, 1)));
        assert_eq!(second_document("---\n---\n"), Some((2, 1)));
        assert_eq!(second_document("a: |\n  x\n...\n\nb: 2\n"), Some((5, 1)));
        assert_eq!(second_document(" a: 1\n # c\n b: 2\nc: 3\n"), Some((4, 1)));
        assert_eq!(second_document("!a:\n}  b: 1\n"), Some((2, 1)));
        assert_eq!(second_document("a: [1,\n 2]\n---\n"), Some((3, 1)));
    }

    #[test]
    fn deep_flow_and_block_nesting_is_refused_with_its_place() {
        let flow = format!("a: {}", "[".repeat(100));
        let e = check(&flow).unwrap_err();
        assert!(e.contains("line 1 column 67"), "{e}");
        let block: String = (0..100)
            .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
            .collect();
        let e = check(&block).unwrap_err();
        assert!(e.contains("line 65 column 65"), "{e}");
        let dashes = format!("{}x\n", "- ".repeat(100));
        assert!(check(&dashes).unwrap_err().contains("line 1"));
    }
}
