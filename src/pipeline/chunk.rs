//! The response-chunk phase: steps that see each response chunk as it passes, may rewrite
//! it, hold back a bounded tail, or end the stream; and, for server-sent events, the
//! reassembly of events split across chunks so such a step sees whole events.
//!
//! Only flows with a chunk step pay for any of this: the stream keeps a [`ChunkRunner`]
//! only when the flow has one.

use crate::vars::Exchange;

use super::Step;

/// Default bound on one server-sent event a step waits for: 1 MiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = crate::llm::sse::DEFAULT_MAX_EVENT_BYTES;

/// What a chunk step declared in [`super::Hooks::response_chunks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpec {
    /// The most bytes the step may hold back at once ([`ChunkAction::Hold`] is cut to it).
    pub max_hold: usize,
    /// On a `text/event-stream` response, hand the step whole events only: an event split
    /// across chunks waits (at most `max_event_bytes`) until it is complete.
    pub sse_events: bool,
    /// The longest unfinished event held for the step; a longer one is handed over in
    /// pieces (with [`Chunk::whole_events`] false) rather than held without bound.
    pub max_event_bytes: usize,
}

impl ChunkSpec {
    /// Raw chunks, holding back at most `max_hold` bytes.
    pub const fn bytes(max_hold: usize) -> Self {
        Self {
            max_hold,
            sse_events: false,
            max_event_bytes: 0,
        }
    }

    /// Whole server-sent events, holding back at most `max_hold` bytes of them.
    pub const fn events(max_hold: usize) -> Self {
        Self {
            max_hold,
            sse_events: true,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        }
    }
}

/// The bytes a chunk step sees: what passed the earlier chunk steps, after what it held
/// back last time.
#[derive(Debug, Default)]
pub struct Chunk {
    /// The bytes to pass on; the step may rewrite them.
    pub data: Vec<u8>,
    /// The last chunk of the response: nothing can be held back any more.
    pub end_of_stream: bool,
    /// `data` is whole server-sent events (the step asked for events, the response is
    /// `text/event-stream`, and no event outgrew the bound).
    pub whole_events: bool,
}

impl Chunk {
    /// The server-sent events in `data`, each with its closing blank line (a last one may
    /// lack it at the end of the stream).
    pub fn events(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = self.data.as_slice();
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let end = match first_event_end(rest) {
                0 => rest.len(),
                n => n,
            };
            let (event, tail) = rest.split_at(end);
            rest = tail;
            Some(event)
        })
    }
}

/// What a chunk step decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkAction {
    /// Pass `data` on.
    Pass,
    /// Pass `data` on except its last `n` bytes, which come back at the front of the next
    /// chunk (cut to the declared `max_hold`; ignored on the last chunk).
    Hold(usize),
    /// `data` is the last chunk: the stream ends with it, and nothing more of the upstream's
    /// body reaches the client.
    End,
}

/// Where the first event of `buf` ends (after its blank line), or 0 when no event is
/// complete.
fn first_event_end(buf: &[u8]) -> usize {
    scan_events(buf, true)
}

/// Where the last complete event of `buf` ends, or 0.
fn last_event_end(buf: &[u8]) -> usize {
    scan_events(buf, false)
}

/// Finds event ends: an empty line (after CRLF, LF or CR line ends). `buf` starts at an
/// event boundary.
fn scan_events(buf: &[u8], first: bool) -> usize {
    let mut end = 0;
    let mut line_start = 0;
    let mut i = 0;
    while let Some(p) = buf[i..].iter().position(|&b| b == b'\n' || b == b'\r') {
        let at = i + p;
        let mut next = at + 1;
        if buf[at] == b'\r' && buf.get(next) == Some(&b'\n') {
            next += 1;
        }
        if at == line_start {
            end = next;
            if first {
                return end;
            }
        }
        line_start = next;
        i = next;
    }
    end
}

#[derive(Debug, Default)]
struct Slot {
    active: bool,
    events: bool,
    held: Vec<u8>,
}

/// The chunk steps' state for one response.
#[derive(Debug, Default)]
pub struct ChunkRunner {
    slots: Vec<Slot>,
    ended: bool,
}

impl ChunkRunner {
    /// Starts on a response whose headers are known: each step's condition is decided
    /// once, here.
    pub fn start(steps: &[(Step, ChunkSpec)], ex: &Exchange) -> Self {
        let sse = ex
            .response
            .as_ref()
            .and_then(|r| r.headers.get("content-type"))
            .is_some_and(|ct| ct.starts_with("text/event-stream"));
        let slots = steps
            .iter()
            .map(|(step, spec)| Slot {
                active: step.applies(ex),
                events: sse && spec.sse_events,
                held: Vec::new(),
            })
            .collect();
        Self {
            slots,
            ended: false,
        }
    }

    /// A step ended the stream: nothing more passes.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Bytes held back by the steps now.
    pub fn held(&self) -> usize {
        self.slots.iter().map(|s| s.held.len()).sum()
    }

    /// Runs one chunk through the steps: the bytes to pass on and whether they end the
    /// stream. `eos` releases everything held.
    pub fn push(
        &mut self,
        steps: &[(Step, ChunkSpec)],
        ex: &mut Exchange,
        data: Vec<u8>,
        eos: bool,
    ) -> (Vec<u8>, bool) {
        if self.ended {
            return (Vec::new(), true);
        }
        let mut data = data;
        let mut eos = eos;
        for ((step, spec), slot) in steps.iter().zip(self.slots.iter_mut()) {
            if !slot.active {
                continue;
            }
            let mut buf = if slot.held.is_empty() {
                data
            } else {
                let mut held = std::mem::take(&mut slot.held);
                held.extend_from_slice(&data);
                held
            };
            let mut whole = slot.events;
            let mut rest = Vec::new();
            if slot.events && !eos {
                let cut = last_event_end(&buf);
                if buf.len() - cut > spec.max_event_bytes {
                    tracing::debug!(policy = %step.policy_name, limit = spec.max_event_bytes, "server-sent event longer than the bound; handed over in pieces");
                    whole = false;
                } else {
                    rest = buf.split_off(cut);
                }
            }
            if buf.is_empty() && !eos {
                slot.held = rest;
                data = Vec::new();
                continue;
            }
            let mut chunk = Chunk {
                data: buf,
                end_of_stream: eos,
                whole_events: whole,
            };
            let action = step.policy.response_chunk(ex, &mut chunk);
            let mut out = chunk.data;
            match action {
                ChunkAction::Pass => {}
                ChunkAction::Hold(n) if !eos => {
                    let n = n.min(spec.max_hold).min(out.len());
                    slot.held = out.split_off(out.len() - n);
                }
                ChunkAction::Hold(_) => {}
                ChunkAction::End => {
                    tracing::debug!(policy = %step.policy_name, "a chunk step ended the stream");
                    eos = true;
                    self.ended = true;
                    rest.clear();
                }
            }
            slot.held.extend_from_slice(&rest);
            data = out;
        }
        (data, eos)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pipeline::{Hooks, Policy};
    use crate::vars::{Headers, ResponseInfo};

    /// Replaces `secret` with `*****` even when it spans chunks (holding back up to 5
    /// bytes), records the events it saw, and ends the stream at an event containing `stop`.
    #[derive(Debug, Default)]
    struct Redact {
        seen: log::Log,
        events: bool,
    }

    mod log {
        use std::sync::atomic::{AtomicUsize, Ordering};
        #[derive(Debug, Default)]
        pub struct Log {
            pub calls: AtomicUsize,
            pub partial: AtomicUsize,
        }
        impl Log {
            pub fn call(&self, whole: bool) {
                self.calls.fetch_add(1, Ordering::Relaxed);
                if !whole {
                    self.partial.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    impl Policy for Redact {
        fn type_name(&self) -> &'static str {
            "Redact"
        }
        fn hooks(&self) -> Hooks {
            Hooks {
                response_chunks: Some(if self.events {
                    ChunkSpec::events(5)
                } else {
                    ChunkSpec::bytes(5)
                }),
                ..Hooks::default()
            }
        }
        fn response_chunk(&self, _ex: &mut Exchange, chunk: &mut Chunk) -> ChunkAction {
            self.seen.call(!self.events || chunk.whole_events);
            if chunk.whole_events && !chunk.end_of_stream {
                assert!(chunk
                    .events()
                    .all(|e| e.ends_with(b"\n") || e.ends_with(b"\r")));
            }
            let text = String::from_utf8_lossy(&chunk.data).replace("secret", "*****");
            if let Some(at) = text.find("stop") {
                let end = text[at..].find("\n\n").map_or(text.len(), |e| at + e + 2);
                chunk.data = format!("{}data: [ended]\n\n", &text[..end]).into_bytes();
                return ChunkAction::End;
            }
            chunk.data = text.into_bytes();
            // A prefix of "secret" at the end may complete in the next chunk.
            let keep = (1..=5)
                .rev()
                .find(|&n| chunk.data.ends_with(&b"secret"[..n]))
                .unwrap_or(0);
            if chunk.data.starts_with(b"HOLDALL") {
                return ChunkAction::Hold(usize::MAX); // asks too much: cut to the declared 5
            }
            ChunkAction::Hold(keep)
        }
    }

    fn steps(events: bool) -> (Vec<(Step, ChunkSpec)>, Arc<Redact>) {
        let p = Arc::new(Redact {
            events,
            ..Default::default()
        });
        let step = Step {
            policy_name: "redact".into(),
            policy: p.clone(),
            condition: None,
            continue_on_error: false,
        };
        let spec = p.hooks().response_chunks.unwrap();
        (vec![(step, spec)], p)
    }

    fn exchange(content_type: &str) -> Exchange {
        let mut h = Headers::new();
        h.push("content-type".into(), content_type.into());
        Exchange {
            response: Some(ResponseInfo {
                status: 200,
                headers: h,
            }),
            ..Default::default()
        }
    }

    fn run(steps: &[(Step, ChunkSpec)], ex: &mut Exchange, chunks: &[&str]) -> (Vec<String>, bool) {
        let mut r = ChunkRunner::start(steps, ex);
        let mut out = Vec::new();
        let mut ended = false;
        for (i, c) in chunks.iter().enumerate() {
            let eos = i + 1 == chunks.len();
            let (data, end) = r.push(steps, ex, c.as_bytes().to_vec(), eos);
            assert!(r.held() <= 5 || steps[0].1.sse_events, "held {}", r.held());
            out.push(String::from_utf8(data).unwrap());
            assert_eq!(end, eos || r.ended());
            if r.ended() {
                ended = true;
                break;
            }
        }
        (out, ended)
    }

    #[test]
    fn rewrites_across_chunks_and_holds_no_more_than_declared() {
        let (steps, _) = steps(false);
        let mut ex = exchange("text/plain");
        let (out, ended) = run(&steps, &mut ex, &["a sec", "ret b secr", "et", " c se"]);
        assert!(!ended);
        assert_eq!(out, ["a ", "***** b ", "*****", " c se"]);
        // A hook asking for more than it declared holds only the declared 5 bytes.
        let (out, _) = run(&steps, &mut ex, &["HOLDALL-123456789", "x"]);
        assert_eq!(out, ["HOLDALL-1234", "56789x"]);
    }

    #[test]
    fn ends_the_stream_with_a_final_chunk() {
        let (steps, _) = steps(false);
        let mut ex = exchange("text/plain");
        let mut r = ChunkRunner::start(&steps, &ex);
        let (a, end) = r.push(
            &steps,
            &mut ex,
            b"data: 1\n\ndata: stop\n\ndata: 3\n\n".to_vec(),
            false,
        );
        assert!(end && r.ended());
        assert_eq!(a, b"data: 1\n\ndata: stop\n\ndata: [ended]\n\n");
        // Whatever the upstream still sends goes nowhere.
        assert_eq!(
            r.push(&steps, &mut ex, b"more".to_vec(), true),
            (Vec::new(), true)
        );
    }

    #[test]
    fn events_are_whole_across_chunks_and_line_ends() {
        let (steps, p) = steps(true);
        let mut ex = exchange("text/event-stream; charset=utf-8");
        let (out, ended) = run(
            &steps,
            &mut ex,
            &[
                "data: {\"a\":",
                "1}\n",
                "\ndata: x\r\n\r",
                "\ndata: y\r\rdata: tail",
                "",
            ],
        );
        assert!(!ended);
        assert_eq!(out[0], "", "half an event waits");
        assert_eq!(out[1], "", "still no blank line");
        assert_eq!(out[2], "data: {\"a\":1}\n\ndata: x\r\n\r");
        assert_eq!(
            out.concat(),
            "data: {\"a\":1}\n\ndata: x\r\n\r\ndata: y\r\rdata: tail"
        );
        assert_eq!(p.seen.partial.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn an_oversized_event_is_not_held_without_bound() {
        let (mut steps, p) = steps(true);
        steps[0].1.max_event_bytes = 8;
        let mut ex = exchange("text/event-stream");
        let (out, _) = run(&steps, &mut ex, &["data: 0123456789", "\n\n"]);
        assert_eq!(out[0], "data: 0123456789");
        assert_eq!(p.seen.partial.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn event_splitting() {
        let c = Chunk {
            data: b"a\n\nb\r\n\r\n\nc".to_vec(),
            end_of_stream: true,
            whole_events: true,
        };
        let e: Vec<&[u8]> = c.events().collect();
        assert_eq!(e, [&b"a\n\n"[..], b"b\r\n\r\n", b"\n", b"c"]);
        assert_eq!(last_event_end(b"a\nb\n"), 0);
        assert_eq!(last_event_end(b"a\n\nb"), 3);
    }
}
