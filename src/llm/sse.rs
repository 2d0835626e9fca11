//! Incremental server-sent events decoder (the WHATWG event-stream rules), fed arbitrary byte
//! chunks as they pass.
//!
//! Handles what bites on the wire: an event (or a line, or a CRLF pair) split across chunks;
//! LF, CRLF and lone CR line ends; `:` comments and keep-alives; several `data:` lines per
//! event (joined with `\n`); a leading BOM. Memory is bounded: an event whose bytes (pending
//! line + data + event name) exceed the limit is an error ([`SseError::EventTooLarge`]), and
//! the decoder then refuses everything after it (it cannot know where the next event starts
//! without reading what it refused to hold).

/// Default bound on one event's buffered bytes: 1 MiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

/// One dispatched event. `event` is empty when the event had no `event:` line (the spec's
/// default type, `message`). `data` is the `data:` lines joined with `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent<'a> {
    pub event: &'a str,
    pub data: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("server-sent event longer than {limit} bytes")]
    EventTooLarge { limit: usize },
}

#[derive(Debug)]
pub struct SseDecoder {
    max: usize,
    /// A line not yet terminated, carried to the next chunk.
    line: Vec<u8>,
    fields: Fields,
    /// The previous chunk ended with CR: an LF opening this one belongs to it.
    skip_lf: bool,
    first_line: bool,
    failed: bool,
    /// A `:` comment line was read since [`SseDecoder::take_comments`].
    comments: bool,
}

#[derive(Debug, Default)]
struct Fields {
    data: Vec<u8>,
    event: Vec<u8>,
    has_data: bool,
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_EVENT_BYTES)
    }
}

impl SseDecoder {
    /// A decoder holding at most `max_event_bytes` of one event.
    pub fn new(max_event_bytes: usize) -> Self {
        SseDecoder {
            max: max_event_bytes,
            line: Vec::new(),
            fields: Fields::default(),
            skip_lf: false,
            first_line: true,
            failed: false,
            comments: false,
        }
    }

    /// Decode `chunk`, calling `on_event` for every event it completes.
    pub fn push(
        &mut self,
        chunk: &[u8],
        mut on_event: impl FnMut(SseEvent<'_>),
    ) -> Result<(), SseError> {
        if self.failed {
            return Err(self.too_large());
        }
        let mut rest = chunk;
        if self.skip_lf && !rest.is_empty() {
            self.skip_lf = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        while let Some(i) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            let end = rest[i];
            if self.line.is_empty() {
                self.line_done(&rest[..i], &mut on_event)?;
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&rest[..i]);
                let r = self.line_done(&line, &mut on_event);
                line.clear();
                self.line = line;
                r?;
            }
            rest = &rest[i + 1..];
            if end == b'\r' {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    Some(_) => {}
                    None => self.skip_lf = true,
                }
            }
        }
        if !rest.is_empty() {
            self.line.extend_from_slice(rest);
            self.check_size()?;
        }
        Ok(())
    }

    /// The stream ended: a last line without its line end, and an event without its closing
    /// blank line, are still delivered (servers that end without the final blank line exist;
    /// the spec would drop it, but usage often rides in that last event).
    pub fn finish(&mut self, mut on_event: impl FnMut(SseEvent<'_>)) -> Result<(), SseError> {
        if self.failed {
            return Err(self.too_large());
        }
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, &mut on_event)?;
        }
        self.line_done(b"", &mut on_event)
    }

    /// Whether comment lines (keep-alives) were read since the last call: a step that
    /// rewrites the stream can keep one going.
    pub fn take_comments(&mut self) -> bool {
        std::mem::take(&mut self.comments)
    }

    /// Decode `chunk` into owned events (tests, callers that keep events).
    pub fn push_collect(&mut self, chunk: &[u8]) -> Result<Vec<(String, String)>, SseError> {
        let mut out = Vec::new();
        self.push(chunk, |e| out.push((e.event.to_owned(), e.data.to_owned())))?;
        Ok(out)
    }

    fn too_large(&self) -> SseError {
        SseError::EventTooLarge { limit: self.max }
    }

    fn check_size(&mut self) -> Result<(), SseError> {
        let held = self.line.len() + self.fields.data.len() + self.fields.event.len();
        if held > self.max {
            self.failed = true;
            self.line = Vec::new();
            self.fields = Fields::default();
            return Err(self.too_large());
        }
        Ok(())
    }

    fn line_done(
        &mut self,
        mut line: &[u8],
        on_event: &mut impl FnMut(SseEvent<'_>),
    ) -> Result<(), SseError> {
        if self.first_line {
            self.first_line = false;
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.is_empty() {
            let f = &mut self.fields;
            if f.has_data {
                let event = String::from_utf8_lossy(&f.event);
                let data = String::from_utf8_lossy(&f.data);
                on_event(SseEvent {
                    event: &event,
                    data: &data,
                });
            }
            f.data.clear();
            f.event.clear();
            f.has_data = false;
            return Ok(());
        }
        if line[0] == b':' {
            self.comments = true;
            return Ok(());
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match name {
            b"data" => {
                if self.fields.has_data {
                    self.fields.data.push(b'\n');
                }
                self.fields.data.extend_from_slice(value);
                self.fields.has_data = true;
            }
            b"event" => {
                self.fields.event.clear();
                self.fields.event.extend_from_slice(value);
            }
            // `id`, `retry` and unknown fields carry nothing tollgate reads.
            _ => {}
        }
        self.check_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Vec<(String, String)> {
        let mut d = SseDecoder::default();
        let mut out = d.push_collect(input).unwrap();
        d.finish(|e| out.push((e.event.to_owned(), e.data.to_owned())))
            .unwrap();
        out
    }

    fn ev(event: &str, data: &str) -> (String, String) {
        (event.to_owned(), data.to_owned())
    }

    #[test]
    fn line_ends_comments_and_multiline_data() {
        let input = b"\xEF\xBB\xBF: keep-alive\r\nevent: a\r\ndata: one\r\ndata:two\r\n\r\n\
                      data: lf\n\ndata: cr\r\rid: 7\nretry: 10\nnoval\ndata\n\n: only a comment\n\n";
        assert_eq!(
            decode_all(input),
            vec![ev("a", "one\ntwo"), ev("", "lf"), ev("", "cr"), ev("", "")]
        );
    }

    #[test]
    fn every_split_gives_the_same_events() {
        let input: &[u8] =
            b"event: x\r\ndata: {\"a\":1}\r\n\r\n:c\rdata: a\rdata: b\r\rdata: [DONE]\n\n";
        let whole = decode_all(input);
        assert_eq!(whole.len(), 3);
        for i in 0..=input.len() {
            for j in i..=input.len() {
                let mut d = SseDecoder::default();
                let mut out = d.push_collect(&input[..i]).unwrap();
                out.extend(d.push_collect(&input[i..j]).unwrap());
                out.extend(d.push_collect(&input[j..]).unwrap());
                d.finish(|e| out.push((e.event.to_owned(), e.data.to_owned())))
                    .unwrap();
                assert_eq!(out, whole, "split at {i},{j}");
            }
        }
    }

    #[test]
    fn byte_by_byte_crlf() {
        let input = b"data: x\r\n\r\ndata: y\r\n\r\n";
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        for b in input.iter() {
            out.extend(d.push_collect(std::slice::from_ref(b)).unwrap());
        }
        assert_eq!(out, vec![ev("", "x"), ev("", "y")]);
    }

    #[test]
    fn unterminated_last_event_is_delivered_at_finish() {
        let mut d = SseDecoder::default();
        assert!(d.push_collect(b"data: {\"usage\":1}").unwrap().is_empty());
        let mut out = Vec::new();
        d.finish(|e| out.push(e.data.to_owned())).unwrap();
        assert_eq!(out, vec!["{\"usage\":1}".to_owned()]);
    }

    #[test]
    fn over_long_event_is_an_error_not_growth() {
        let mut d = SseDecoder::new(64);
        assert!(d.push_collect(b"data: short\n\n").is_ok());
        // A line that never ends.
        let mut r = Ok(Vec::new());
        for _ in 0..100 {
            r = d.push_collect(&[b'x'; 16]);
            if r.is_err() {
                break;
            }
        }
        assert_eq!(r, Err(SseError::EventTooLarge { limit: 64 }));
        assert!(d.line.capacity() == 0);
        // Many short data lines add up too.
        let mut d = SseDecoder::new(64);
        let r = d.push_collect(&b"data: 0123456789\n".repeat(10));
        assert_eq!(r, Err(SseError::EventTooLarge { limit: 64 }));
        // The decoder stays failed.
        assert!(d.push_collect(b"\n\ndata: ok\n\n").is_err());
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let out = decode_all(b"data: \xff\xfe\n\n");
        assert_eq!(out, vec![ev("", "\u{fffd}\u{fffd}")]);
    }
}
