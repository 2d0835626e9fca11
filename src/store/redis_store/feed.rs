//! The Redis backend's change feed: numbered notices on a pub/sub channel, a subscriber task
//! that reconnects with back-off, and a gap check on the write counter (see the parent
//! module's documentation).

use std::collections::BTreeSet;
use std::sync::LazyLock;
use std::time::Duration;

use futures_util::StreamExt;
use prometheus::IntCounterVec;
use redis::Value;
use tokio::sync::broadcast;

use super::{
    bounded, unavailable, Conn, CHANGES_CHANNEL, COMMAND_TIMEOUT, CONNECT_TIMEOUT, SEQ_KEY,
};
use crate::store::{Change, StoreError};

/// How often the change feed compares the counter with the notices it heard.
pub const GAP_CHECK_EVERY: Duration = Duration::from_millis(500);
/// Notices heard out of order that the gap check keeps; past this it stops waiting and resyncs.
const MAX_AHEAD: usize = 4096;
/// How often an idle pub/sub connection is checked with a PING.
const PING_EVERY: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Change-feed re-reads by reason: `reconnect` (the pub/sub connection was re-established),
/// `gap` (a numbered notice never arrived), `counter_reset` (the counter went back: Redis
/// lost its data).
static FEED_RESYNCS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new(
            "tollgate_store_feed_resyncs_total",
            "Full re-reads of the Redis store requested by the change feed, by reason",
        ),
        &["reason"],
    )
    .expect("valid metric");
    if let Err(e) = crate::telemetry::METRICS
        .registry
        .register(Box::new(c.clone()))
    {
        tracing::warn!(error = %e, "store feed metric not registered");
    }
    c
});

/// Aborts the subscriber task when the store goes away.
pub(super) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The change channel of database `db`.
pub(super) fn changes_channel(db: i64) -> String {
    if db == 0 {
        CHANGES_CHANNEL.to_owned()
    } else {
        format!("{CHANGES_CHANNEL}:{db}")
    }
}

/// A subscribed pub/sub connection to one node.
async fn subscribe(
    client: &redis::Client,
    channel: &str,
) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    Ok(pubsub)
}

/// Reads a change notice and its number, if it has one; anything unknown asks for a full
/// re-read.
fn parse_notice(payload: &[u8]) -> (Option<u64>, Change) {
    let Ok(mut text) = std::str::from_utf8(payload) else {
        return (None, Change::Resync);
    };
    let mut seq = None;
    // Unnumbered notices start with a letter, so a leading number is unambiguous.
    if let Some((n, rest)) = text.split_once(' ') {
        if let Ok(n) = n.parse::<u64>() {
            seq = Some(n);
            text = rest;
        }
    }
    let change = match text.split_once(':') {
        Some(("product", name)) => Change::Product(name.to_owned()),
        Some(("app", name)) => Change::App(name.to_owned()),
        _ => Change::Resync,
    };
    (seq, change)
}

pub(super) fn change_message(seq: Option<u64>, change: &Change) -> String {
    let text = match change {
        Change::Product(name) => format!("product:{name}"),
        Change::App(name) => format!("app:{name}"),
        Change::Resync => "resync".to_owned(),
    };
    match seq {
        Some(n) => format!("{n} {text}"),
        None => text,
    }
}

/// What the change feed has heard of the write counter, to find notices that never came.
#[derive(Debug, Default)]
struct Heard {
    /// Every notice up to this number was heard, or predates the subscription; `None` until
    /// the counter could be read.
    through: Option<u64>,
    /// Numbers heard beyond `through`.
    ahead: BTreeSet<u64>,
    /// The counter at the previous check, when it stood above `through`.
    suspect: Option<u64>,
}

/// What a counter check found.
#[derive(Debug, PartialEq, Eq)]
enum Check {
    Fine,
    /// A notice at or below the counter of the previous check has still not come.
    Gap,
    /// The counter is below what was heard: Redis lost its data or was flushed.
    CounterReset,
}

impl Heard {
    /// Everything up to `counter` is accounted for (it was read before the consumer's next
    /// full read).
    fn start_at(&mut self, counter: u64) {
        self.through = Some(counter);
        self.ahead.retain(|&n| n > counter);
        self.suspect = None;
        self.advance();
    }

    fn advance(&mut self) {
        if let Some(t) = self.through.as_mut() {
            while self.ahead.remove(&(*t + 1)) {
                *t += 1;
            }
        }
    }

    fn heard(&mut self, seq: u64) {
        if self.through.is_some_and(|t| seq <= t) {
            return;
        }
        if self.through.is_none() && self.ahead.len() >= MAX_AHEAD {
            // Kept only for the first check, which drops what it covers.
            self.ahead.pop_first();
        }
        self.ahead.insert(seq);
        self.advance();
    }

    /// Compares the counter read now with what was heard. After `Gap` or `CounterReset` the
    /// caller sends `Resync` and calls `start_at(counter)`.
    fn check(&mut self, counter: u64) -> Check {
        let Some(through) = self.through else {
            self.start_at(counter);
            return Check::Fine;
        };
        if counter < through || self.ahead.last().is_some_and(|&n| n > counter) {
            return Check::CounterReset;
        }
        // A notice is published right after its increment, so one whole check is plenty of
        // time for it to arrive.
        if self.suspect.is_some_and(|s| through < s) || self.ahead.len() > MAX_AHEAD {
            return Check::Gap;
        }
        self.suspect = (counter > through).then_some(counter);
        Check::Fine
    }
}

/// The feed's view of the write counter: where to read it, and what was heard.
struct Sequence {
    conn: Conn,
    /// The URL without its password, for messages.
    target: String,
    heard: Heard,
}

impl Sequence {
    /// Reads the write counter (0 before the first write).
    async fn read(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("GET").arg(SEQ_KEY).clone();
        let n: Option<u64> = bounded(
            &self.target,
            "read the change counter",
            COMMAND_TIMEOUT,
            cmd.query_async(&mut conn),
        )
        .await?;
        Ok(n.unwrap_or(0))
    }

    /// Starts counting from the counter as it is now; on failure the first check will.
    async fn restart(&mut self) {
        self.heard = Heard::default();
        if let Ok(n) = self.read().await {
            self.heard.start_at(n);
        }
    }

    /// Reads the counter; `Some(reason)` when the consumer must re-read everything.
    async fn check(&mut self) -> Option<&'static str> {
        let n = match self.read().await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "redis change counter unreadable");
                return None;
            }
        };
        let reason = match self.heard.check(n) {
            Check::Fine => return None,
            Check::Gap => "gap",
            Check::CounterReset => "counter_reset",
        };
        self.heard.start_at(n);
        Some(reason)
    }
}

fn resync(tx: &broadcast::Sender<Change>, reason: &'static str) {
    FEED_RESYNCS.with_label_values(&[reason]).inc();
    let _ = tx.send(Change::Resync);
}

/// Forwards messages and checks the counter until the connection is lost.
async fn pump(pubsub: redis::aio::PubSub, tx: &broadcast::Sender<Change>, seq: &mut Sequence) {
    let (mut sink, mut stream) = pubsub.split();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut gaps = tokio::time::interval(GAP_CHECK_EVERY);
    gaps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    gaps.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(msg) => {
                    let (n, change) = parse_notice(msg.get_payload_bytes());
                    if let Some(n) = n {
                        seq.heard.heard(n);
                    }
                    let _ = tx.send(change);
                }
                None => return,
            },
            _ = gaps.tick() => {
                if let Some(reason) = seq.check().await {
                    tracing::warn!(reason, "redis change feed missed a notice; resyncing");
                    resync(tx, reason);
                }
            },
            _ = ping.tick() => {
                match tokio::time::timeout(COMMAND_TIMEOUT, sink.ping::<Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "redis change feed ping failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("redis change feed ping timed out");
                        return;
                    }
                }
            }
        }
    }
}

/// The subscriber task: forwards notices, reconnects with back-off, and sends `Resync` after
/// every reconnect.
async fn follow(
    nodes: Vec<redis::Client>,
    channel: String,
    first: redis::aio::PubSub,
    mut seq: Sequence,
    tx: broadcast::Sender<Change>,
) {
    let mut current = Some(first);
    let mut next = 0usize;
    loop {
        if let Some(pubsub) = current.take() {
            pump(pubsub, &tx, &mut seq).await;
            tracing::warn!(redis = %seq.target, "redis change feed lost; reconnecting");
        }
        let mut backoff = BACKOFF_MIN;
        loop {
            let Some(client) = nodes.get(next % nodes.len().max(1)) else {
                return;
            };
            next = next.wrapping_add(1);
            match tokio::time::timeout(CONNECT_TIMEOUT, subscribe(client, &channel)).await {
                Ok(Ok(pubsub)) => {
                    tracing::info!(redis = %seq.target, "redis change feed reconnected; resyncing");
                    current = Some(pubsub);
                    // Read before the consumer's full re-read, which covers what came before.
                    seq.restart().await;
                    // Whatever was published while disconnected is lost: re-read everything.
                    resync(&tx, "reconnect");
                    break;
                }
                Ok(Err(e)) => {
                    tracing::debug!(redis = %seq.target, error = %e, "redis change feed reconnect failed")
                }
                Err(_) => {
                    tracing::debug!(redis = %seq.target, "redis change feed reconnect timed out")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// Where the feed listens, and how to read the write counter.
pub(super) struct Feed {
    /// Clients of the seed nodes, tried in turn.
    pub nodes: Vec<redis::Client>,
    pub channel: String,
    pub conn: Conn,
    /// The URL without its password, for messages.
    pub target: String,
    pub connect_timeout: Duration,
}

impl Feed {
    /// Subscribes (the first node that answers), reads the write counter, and starts the
    /// subscriber task forwarding to `changes`; it stops when the handle drops.
    pub async fn start(
        self,
        changes: broadcast::Sender<Change>,
    ) -> Result<AbortOnDrop, StoreError> {
        // Every reason at 0 from the start, so a resync-rate alert has a series.
        for reason in ["reconnect", "gap", "counter_reset"] {
            FEED_RESYNCS.with_label_values(&[reason]);
        }
        let mut first = None;
        let mut last_error = None;
        for client in &self.nodes {
            match tokio::time::timeout(self.connect_timeout, subscribe(client, &self.channel)).await
            {
                Ok(Ok(p)) => {
                    first = Some(p);
                    break;
                }
                Ok(Err(e)) => last_error = Some(e.to_string()),
                Err(_) => last_error = Some("timed out".to_owned()),
            }
        }
        let Some(first) = first else {
            return Err(unavailable(
                &self.target,
                "subscribe to the change channel",
                last_error.unwrap_or_else(|| "no node".to_owned()),
            ));
        };
        // Read after subscribing: every later write is then heard or found missing.
        let mut seq = Sequence {
            conn: self.conn,
            target: self.target,
            heard: Heard::default(),
        };
        seq.restart().await;
        let task = tokio::spawn(follow(self.nodes, self.channel, first, seq, changes));
        Ok(AbortOnDrop(task))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_messages() {
        for c in [
            Change::Product("a:b ü".into()),
            Change::Product("12 b".into()),
            Change::App("x".into()),
            Change::Resync,
        ] {
            for seq in [None, Some(0), Some(u64::MAX)] {
                assert_eq!(
                    parse_notice(change_message(seq, &c).as_bytes()),
                    (seq, c.clone())
                );
            }
        }
        assert_eq!(parse_notice(b"\xff"), (None, Change::Resync));
        assert_eq!(parse_notice(b"kvm:x"), (None, Change::Resync));
        assert_eq!(parse_notice(b"-1 app:x"), (None, Change::Resync));
        assert_eq!(changes_channel(0), "tollgate:changes");
        assert_eq!(changes_channel(3), "tollgate:changes:3");
    }

    #[test]
    fn heard_in_order_is_fine() {
        let mut h = Heard::default();
        h.start_at(10);
        assert_eq!(h.check(12), Check::Fine);
        h.heard(12);
        h.heard(11);
        assert_eq!(h.through, Some(12));
        assert!(h.ahead.is_empty());
        assert_eq!(h.check(12), Check::Fine);
        assert_eq!(h.check(12), Check::Fine);
        // Notices that predate the start are ignored.
        h.heard(3);
        assert_eq!(h.through, Some(12));
    }

    #[test]
    fn a_notice_in_flight_gets_one_check() {
        let mut h = Heard::default();
        h.start_at(0);
        assert_eq!(h.check(1), Check::Fine);
        h.heard(1);
        assert_eq!(h.check(2), Check::Fine);
        h.heard(2);
        assert_eq!(h.check(2), Check::Fine);
    }

    #[test]
    fn a_lost_notice_is_a_gap_on_the_next_check() {
        let mut h = Heard::default();
        h.start_at(5);
        h.heard(7);
        assert_eq!(h.check(7), Check::Fine);
        // 6 never comes; 8 does.
        h.heard(8);
        assert_eq!(h.check(8), Check::Gap);
        h.start_at(8);
        assert_eq!((h.through, h.ahead.len()), (Some(8), 0));
        assert_eq!(h.check(8), Check::Fine);
        assert_eq!(h.check(8), Check::Fine);
    }

    #[test]
    fn an_unpublished_change_is_a_gap() {
        let mut h = Heard::default();
        h.start_at(0);
        assert_eq!(h.check(1), Check::Fine);
        assert_eq!(h.check(1), Check::Gap);
    }

    #[test]
    fn a_counter_that_goes_back_is_a_reset() {
        let mut h = Heard::default();
        h.start_at(9);
        assert_eq!(h.check(2), Check::CounterReset);
        let mut h = Heard::default();
        h.start_at(0);
        h.heard(4);
        assert_eq!(h.check(1), Check::CounterReset);
    }

    #[test]
    fn an_unknown_start_is_set_by_the_first_check() {
        let mut h = Heard::default();
        h.heard(4);
        assert_eq!(h.check(4), Check::Fine);
        assert_eq!(h.through, Some(4));
        assert_eq!(h.check(4), Check::Fine);
    }

    #[test]
    fn too_many_out_of_order_is_a_gap() {
        let mut h = Heard::default();
        h.start_at(0);
        for n in 2..(MAX_AHEAD as u64 + 3) {
            h.heard(n);
        }
        assert_eq!(h.check(MAX_AHEAD as u64 + 2), Check::Gap);
    }
}
