//! Incremental splitter for a streamed JSON array (`[{…},\n{…}]`, Gemini's
//! `streamGenerateContent` without `alt=sse`), fed arbitrary byte chunks.
//!
//! It tracks only structure (strings, escapes, nesting) and hands each complete element's
//! bytes to the caller; parsing them is the caller's business. A single top-level object
//! instead of an array (an error answer) is handed over as one element. Memory is bounded:
//! an element longer than the limit is an error, and the splitter then refuses the rest.

/// Default bound on one element: 1 MiB.
pub const DEFAULT_MAX_ELEMENT_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonStreamError {
    #[error("streamed JSON element longer than {limit} bytes")]
    ElementTooLarge { limit: usize },
    #[error("unexpected byte {byte:#04x} in streamed JSON array")]
    Unexpected { byte: u8 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the opening `[` (or a lone top-level object).
    Start,
    /// After `[` or `,`: an element or (leniently) `]`.
    BeforeElement,
    /// Inside an element.
    InElement,
    /// After an element: `,` or `]`.
    AfterElement,
    /// The array (or lone object) is closed.
    Done,
}

#[derive(Debug)]
pub struct JsonArrayStream {
    max: usize,
    state: State,
    /// The document is one object, not an array.
    lone: bool,
    depth: u32,
    in_string: bool,
    escape: bool,
    buf: Vec<u8>,
    failed: Option<JsonStreamError>,
}

impl Default for JsonArrayStream {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_ELEMENT_BYTES)
    }
}

impl JsonArrayStream {
    pub fn new(max_element_bytes: usize) -> Self {
        JsonArrayStream {
            max: max_element_bytes,
            state: State::Start,
            lone: false,
            depth: 0,
            in_string: false,
            escape: false,
            buf: Vec::new(),
            failed: None,
        }
    }

    /// Whether the closing `]` (or the end of a lone object) has been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Split `chunk`, calling `on_element` with every element it completes.
    pub fn push(
        &mut self,
        chunk: &[u8],
        mut on_element: impl FnMut(&[u8]),
    ) -> Result<(), JsonStreamError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.push_inner(chunk, &mut on_element);
        if let Err(e) = &r {
            self.failed = Some(e.clone());
            self.buf = Vec::new();
        }
        r
    }

    fn push_inner(
        &mut self,
        chunk: &[u8],
        on_element: &mut impl FnMut(&[u8]),
    ) -> Result<(), JsonStreamError> {
        let mut i = 0;
        while i < chunk.len() {
            let b = chunk[i];
            match self.state {
                State::InElement => {
                    // Scan to the end of the element or of the chunk, then copy once.
                    let start = i;
                    let mut closed = false;
                    while i < chunk.len() {
                        let c = chunk[i];
                        i += 1;
                        if self.in_string {
                            if self.escape {
                                self.escape = false;
                            } else if c == b'\\' {
                                self.escape = true;
                            } else if c == b'"' {
                                self.in_string = false;
                            }
                            continue;
                        }
                        match c {
                            b'"' => self.in_string = true,
                            b'{' | b'[' => self.depth += 1,
                            b'}' | b']' => {
                                self.depth -= 1;
                                if self.depth == 0 {
                                    closed = true;
                                    break;
                                }
                            }
                            _ => {}
                        }
                    }
                    if self.buf.len() + (i - start) > self.max {
                        return Err(JsonStreamError::ElementTooLarge { limit: self.max });
                    }
                    if closed {
                        if self.buf.is_empty() {
                            on_element(&chunk[start..i]);
                        } else {
                            self.buf.extend_from_slice(&chunk[start..i]);
                            on_element(&self.buf);
                            self.buf.clear();
                        }
                        self.state = if self.lone {
                            State::Done
                        } else {
                            State::AfterElement
                        };
                    } else {
                        self.buf.extend_from_slice(&chunk[start..i]);
                    }
                    continue;
                }
                _ if b.is_ascii_whitespace() => {}
                State::Start if b == b'[' => self.state = State::BeforeElement,
                State::Start if b == b'{' => {
                    self.lone = true;
                    self.open_element();
                    continue;
                }
                State::BeforeElement if b == b'{' || b == b'[' => {
                    self.open_element();
                    continue;
                }
                State::BeforeElement | State::AfterElement if b == b']' => self.state = State::Done,
                State::AfterElement if b == b',' => self.state = State::BeforeElement,
                _ => return Err(JsonStreamError::Unexpected { byte: b }),
            }
            i += 1;
        }
        Ok(())
    }

    fn open_element(&mut self) {
        // The opening bracket is read again by the element scan (depth 0 -> 1).
        self.state = State::InElement;
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Result<Vec<String>, JsonStreamError> {
        let mut s = JsonArrayStream::default();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, |e| out.push(String::from_utf8_lossy(e).into_owned()))?;
        }
        Ok(out)
    }

    #[test]
    fn elements_split_anywhere() {
        let doc: &[u8] = b"[{\"a\": \"x}]\\\"{\"},\r\n{\"b\": [1, {\"c\": 2}]}\n,\n[3]\n]\n";
        let whole = split(&[doc]).unwrap();
        assert_eq!(
            whole,
            vec![
                "{\"a\": \"x}]\\\"{\"}".to_owned(),
                "{\"b\": [1, {\"c\": 2}]}".to_owned(),
                "[3]".to_owned()
            ]
        );
        for i in 0..=doc.len() {
            for j in i..=doc.len() {
                assert_eq!(
                    split(&[&doc[..i], &doc[i..j], &doc[j..]]).unwrap(),
                    whole,
                    "{i},{j}"
                );
            }
        }
    }

    #[test]
    fn lone_object_and_empty_array() {
        assert_eq!(
            split(&[b" {\"error\": {\"code\": 400}} "]).unwrap(),
            vec!["{\"error\": {\"code\": 400}}".to_owned()]
        );
        assert_eq!(split(&[b"[", b"]"]).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn garbage_and_oversize_are_errors() {
        assert_eq!(
            split(&[b"data: {}"]),
            Err(JsonStreamError::Unexpected { byte: b'd' })
        );
        assert_eq!(
            split(&[b"[{}}"]),
            Err(JsonStreamError::Unexpected { byte: b'}' })
        );
        assert_eq!(
            split(&[b"[{}]x"]),
            Err(JsonStreamError::Unexpected { byte: b'x' })
        );
        let mut s = JsonArrayStream::new(32);
        let mut r = Ok(());
        s.push(b"[{\"a\":\"", |_| {}).unwrap();
        for _ in 0..10 {
            r = s.push(&[b'y'; 8], |_| {});
            if r.is_err() {
                break;
            }
        }
        assert_eq!(r, Err(JsonStreamError::ElementTooLarge { limit: 32 }));
        assert!(s.push(b"\"}]", |_| {}).is_err());
    }
}
