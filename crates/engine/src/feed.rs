//! One reader of the event log per process, shared by every subscription.
//!
//! Without it, each subscriber would query the log after every commit: a hundred dashboards
//! would turn one commit into a hundred queries. Instead, one task reads what was appended
//! (every event, unfiltered) and broadcasts it in batches; each subscription filters in
//! memory. The broadcast channel is bounded, so a slow subscriber cannot hold memory: when it
//! falls behind it loses its place in the channel and reads the log itself from its cursor,
//! then rejoins the broadcast. Batches say which stretch of the log they cover, so a
//! subscription always knows whether it has seen everything up to a point — never a gap,
//! never a repeat.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tasker_store::{EventCursor, EventFilter, EventRecord, Store};
use tokio::sync::broadcast;

/// Events read from the log per query, by the feed and by a subscription catching up.
const PAGE: u64 = 200;
/// Batches the broadcast holds for subscribers that have not taken them yet.
const CHANNEL_BATCHES: usize = 128;
/// How often an idle feed looks at the log even without a signal (a safety net for commits
/// it was not told about).
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// The events of the log in `(after, last]`: every event in that stretch, in log order.
#[derive(Debug)]
pub struct Batch {
    after: Option<EventCursor>,
    events: Vec<EventRecord>,
}

impl Batch {
    fn last(&self) -> Option<EventCursor> {
        self.events.last().map(EventRecord::cursor)
    }
}

/// The shared reader; cheap to clone. Its task runs while someone listens.
#[derive(Clone)]
pub struct EventFeed {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    sender: broadcast::Sender<Arc<Batch>>,
    /// How far the feed has read (set after each batch is sent, and when it starts). A
    /// follower with nothing left to receive that has seen less missed a stretch — the feed
    /// started past it — and reads the log.
    position: tokio::sync::watch::Sender<Option<EventCursor>>,
    /// Whether the reading task runs; taken with the decision to start or stop it, so a
    /// subscriber arriving as the last one leaves is never left without a reader.
    reading: Mutex<bool>,
    /// How far each live subscription has looked (its cursor, 0 before any event), for the
    /// lag of the slowest; a subscription that ended leaves a dead entry, dropped at the next
    /// subscription or reading.
    places: Mutex<Vec<Weak<AtomicI64>>>,
}

impl EventFeed {
    pub fn new(store: Store) -> EventFeed {
        Self::with_capacity(store, CHANNEL_BATCHES)
    }

    fn with_capacity(store: Store, batches: usize) -> EventFeed {
        let (sender, _) = broadcast::channel(batches);
        EventFeed {
            inner: Arc::new(Inner {
                store,
                sender,
                reading: Mutex::new(false),
                position: tokio::sync::watch::Sender::new(None),
                places: Mutex::default(),
            }),
        }
    }

    /// How many events up to the log's `head` the feed has not read yet: 0 when nobody
    /// follows (nothing waits for them); `None` before it has read anything.
    pub fn lag(&self, head: Option<i64>) -> Option<u64> {
        let reading = self
            .inner
            .reading
            .lock()
            .map(|reading| *reading)
            .unwrap_or(false);
        if !reading {
            return Some(0);
        }
        let position = (*self.inner.position.borrow())?;
        Some(u64::try_from(head.unwrap_or(0) - position.0).unwrap_or(0))
    }

    /// How many events up to the log's `head` the furthest-behind subscription on this server
    /// has not looked at yet (0 when none follows): a dashboard that cannot keep up shows here.
    pub fn slowest_subscriber_lag(&self, head: Option<i64>) -> u64 {
        let Ok(mut places) = self.inner.places.lock() else {
            return 0;
        };
        places.retain(|place| place.strong_count() > 0);
        let slowest = places
            .iter()
            .filter_map(Weak::upgrade)
            .map(|place| place.load(Ordering::Relaxed))
            .min();
        slowest.map_or(0, |place| {
            u64::try_from(head.unwrap_or(0) - place).unwrap_or(0)
        })
    }

    /// Follows the log from `cursor` (exclusive; from the start when `None`) for the events
    /// matching `filter`.
    pub fn follow(&self, filter: EventFilter, cursor: Option<EventCursor>) -> Follow {
        let receiver = self.inner.sender.subscribe();
        let mut reading = self.inner.reading.lock().unwrap_or_else(|e| e.into_inner());
        if !*reading {
            *reading = true;
            tokio::spawn(read(self.inner.clone()));
        }
        drop(reading);
        let place = Arc::new(AtomicI64::new(cursor.map_or(0, |cursor| cursor.0)));
        if let Ok(mut places) = self.inner.places.lock() {
            places.retain(|place| place.strong_count() > 0);
            places.push(Arc::downgrade(&place));
        }
        Follow {
            store: self.inner.store.clone(),
            filter,
            seen: cursor,
            place,
            receiver,
            feed_position: self.inner.position.subscribe(),
            caught_up: false,
            ready: std::collections::VecDeque::new(),
            appended: self.inner.store.events_appended(),
            expired: false,
        }
    }
}

/// The feed's task: after each signal, reads everything new and broadcasts it; stops when no
/// subscription is left.
async fn read(inner: Arc<Inner>) {
    let mut appended = inner.store.events_appended();
    // Where the feed has read to; unknown until the log's head could be read.
    let mut position: Option<Option<EventCursor>> = None;
    loop {
        {
            let mut reading = inner.reading.lock().unwrap_or_else(|e| e.into_inner());
            if inner.sender.receiver_count() == 0 {
                *reading = false;
                return;
            }
        }
        appended.borrow_and_update();
        if position.is_none() {
            match inner.store.event_head().await {
                Ok(now) => {
                    position = Some(now);
                    inner.position.send_replace(now);
                }
                Err(err) => {
                    crate::retried("reading the event log's head failed", &err);
                }
            }
        }
        if let Some(head) = position.as_mut() {
            broadcast_new(&inner, head).await;
        }
        let _ = tokio::time::timeout(IDLE_RECHECK, appended.changed()).await;
    }
}

/// Broadcasts everything after `head`, a page per batch, and moves `head` along.
async fn broadcast_new(inner: &Inner, head: &mut Option<EventCursor>) {
    loop {
        match inner
            .store
            // The shared reader reads everything; each subscription filters to its scope.
            .events_page(
                &EventFilter::within(tasker_domain::Within::Any),
                *head,
                PAGE,
            )
            .await
        {
            Ok(events) if !events.is_empty() => {
                let full = events.len() as u64 == PAGE;
                let batch = Batch {
                    after: *head,
                    events,
                };
                *head = batch.last();
                // No receiver is fine: the reading task then ends.
                let _ = inner.sender.send(Arc::new(batch));
                inner.position.send_replace(*head);
                if !full {
                    return;
                }
            }
            Ok(_) => return,
            Err(err) => {
                crate::retried("reading the event log for subscriptions failed", &err);
                return;
            }
        }
    }
}

/// A subscription's place in the log. It holds at most a page of its own, whether it follows
/// the broadcast or catches up from the log.
pub struct Follow {
    store: Store,
    filter: EventFilter,
    /// Every event up to here has been looked at (delivered if it matched).
    seen: Option<EventCursor>,
    /// `seen`, where the feed reads it for the slowest subscription's lag.
    place: Arc<AtomicI64>,
    receiver: broadcast::Receiver<Arc<Batch>>,
    feed_position: tokio::sync::watch::Receiver<Option<EventCursor>>,
    /// Whether the log has been read up to the broadcast; until then, and after losing its
    /// place in the channel, the subscription reads the log itself.
    caught_up: bool,
    ready: std::collections::VecDeque<EventRecord>,
    /// Wakes a subscription that is catching up and found the log's end.
    appended: tokio::sync::watch::Receiver<u64>,
    /// Its place is older than what the log retains: it has nothing more to give.
    expired: bool,
}

impl Follow {
    /// The next matching event; `None` when the server shuts down, or when the subscription
    /// fell so far behind that the retention policy deleted events it had not read.
    pub async fn next(&mut self) -> Option<EventRecord> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(event);
            }
            if self.expired {
                return None;
            }
            if self.caught_up {
                self.take_broadcast().await?;
            } else {
                self.read_log().await;
            }
        }
    }

    /// Everything matching that is already at hand: at least one event (waiting for it), and
    /// the rest of what was read with it.
    pub async fn next_batch(&mut self) -> Option<Vec<EventRecord>> {
        let first = self.next().await?;
        let mut batch = vec![first];
        batch.extend(self.ready.drain(..));
        Some(batch)
    }

    /// Takes the next broadcast batch; a gap (or a lost place) sends it back to the log.
    async fn take_broadcast(&mut self) -> Option<()> {
        let received = loop {
            match self.receiver.try_recv() {
                Err(broadcast::error::TryRecvError::Empty) => {}
                Ok(batch) => break Ok(batch),
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    break Err(broadcast::error::RecvError::Lagged(n));
                }
                Err(broadcast::error::TryRecvError::Closed) => {
                    break Err(broadcast::error::RecvError::Closed);
                }
            }
            // Nothing waiting, yet the feed has read past what this follower saw: the batches
            // for that stretch went out before it joined.
            if *self.feed_position.borrow_and_update() > self.seen {
                self.caught_up = false;
                return Some(());
            }
            tokio::select! {
                received = self.receiver.recv() => break received,
                changed = self.feed_position.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
            }
        };
        match received {
            Ok(batch) => {
                let Some(last) = batch.last() else {
                    return Some(());
                };
                if self.seen.is_some_and(|seen| last <= seen) {
                    return Some(());
                }
                if batch.after > self.seen {
                    // Events between what this subscription saw and this batch were never
                    // broadcast to it (it joined as the feed started): read them from the log.
                    self.caught_up = false;
                    return Some(());
                }
                let seen = self.seen;
                self.ready.extend(
                    batch
                        .events
                        .iter()
                        .filter(|event| seen.is_none_or(|seen| event.cursor() > seen))
                        .filter(|event| self.filter.matches(event))
                        .cloned(),
                );
                self.saw(Some(last));
                Some(())
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                self.caught_up = false;
                Some(())
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// Moves the subscription's place in the log.
    fn saw(&mut self, seen: Option<EventCursor>) {
        self.seen = seen;
        if let Some(cursor) = seen {
            self.place.store(cursor.0, Ordering::Relaxed);
        }
    }

    /// Reads a page of matching events from the log; at the log's end, joins the broadcast.
    async fn read_log(&mut self) {
        self.appended.borrow_and_update();
        // Joined before the log is read: every batch sent from now on is received, and those
        // the log read covers are skipped.
        self.receiver = self.receiver.resubscribe();
        // Everything up to the head is visible now, so a short page means it was all seen.
        let head = match self.store.event_head().await {
            Ok(head) => head,
            Err(err) => {
                crate::retried("reading the event log for a subscription failed", &err);
                self.pause().await;
                return;
            }
        };
        match self.store.events_page(&self.filter, self.seen, PAGE).await {
            Ok(page) => {
                let last = page.last().map(EventRecord::cursor);
                if page.len() as u64 == PAGE {
                    self.saw(last);
                } else {
                    self.saw(self.seen.max(head).max(last));
                    self.caught_up = true;
                }
                self.ready.extend(page);
            }
            Err(err @ tasker_store::Error::CursorExpired { .. }) => {
                // It fell behind what the log retains: its stream ends, and resuming from its
                // cursor says why.
                tracing::warn!(error = %err, "a subscription fell behind the retained event log; its stream ends");
                self.expired = true;
            }
            Err(err) => {
                crate::retried("reading the event log for a subscription failed", &err);
                self.pause().await;
            }
        }
    }

    /// Waits a little before trying the log again after an error.
    async fn pause(&mut self) {
        let _ = tokio::time::timeout(IDLE_RECHECK, self.appended.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tasker_store::testing::TestDatabase;

    fn template(i: usize) -> String {
        format!(
            "namespace: {}\nname: t{i}\nversion: 1.0.0\nsteps:\n  - {{name: a, handler: noop}}\n",
            if i.is_multiple_of(2) { "even" } else { "odd" }
        )
    }

    async fn databases() -> Vec<TestDatabase> {
        TestDatabase::all(Arc::new(tasker_domain::SystemClock)).await
    }

    /// Takes `count` events, failing rather than hanging.
    async fn take(follow: &mut Follow, count: usize) -> Vec<EventRecord> {
        let mut events = Vec::new();
        while events.len() < count {
            let event = tokio::time::timeout(Duration::from_secs(10), follow.next())
                .await
                .expect("an event within 10 s")
                .expect("the feed runs");
            events.push(event);
        }
        events
    }

    #[tokio::test]
    async fn followers_get_every_matching_event_once_in_log_order() {
        for db in databases().await {
            let store = &db.store;
            let feed = EventFeed::new(store.clone());
            let mut everything = feed.follow(EventFilter::within(tasker_domain::Within::Any), None);
            let even = tasker_domain::NamespaceSet::one("even");
            let mut evens =
                feed.follow(EventFilter::within(tasker_domain::Within::Only(even)), None);
            for i in 0..20 {
                store.register_template(&template(i), false).await.unwrap();
            }
            let all = take(&mut everything, 20).await;
            let log = store
                .events_page(&EventFilter::within(tasker_domain::Within::Any), None, 100)
                .await
                .unwrap();
            assert_eq!(all, log, "{}", db.backend());
            let even = take(&mut evens, 10).await;
            let expected: Vec<_> = log
                .iter()
                .filter(|e| e.namespace.as_deref() == Some("even"))
                .cloned()
                .collect();
            assert_eq!(even, expected);
            // A follower that joins from a cursor in the middle gets exactly the rest.
            let mut late = feed.follow(
                EventFilter::within(tasker_domain::Within::Any),
                Some(log[4].cursor()),
            );
            assert_eq!(take(&mut late, 15).await, log[5..].to_vec());
        }
    }

    /// A follower that falls far behind loses its place in the broadcast and reads the log
    /// itself: it still receives everything, once, in order.
    #[tokio::test]
    async fn a_follower_that_falls_behind_catches_up_from_the_log() {
        for db in databases().await {
            let store = &db.store;
            let feed = EventFeed::with_capacity(store.clone(), 2);
            let mut slow = feed.follow(EventFilter::within(tasker_domain::Within::Any), None);
            let mut keeping_up = feed.follow(EventFilter::within(tasker_domain::Within::Any), None);
            let mut kept = Vec::new();
            for i in 0..30 {
                store.register_template(&template(i), false).await.unwrap();
                kept.extend(take(&mut keeping_up, 1).await);
            }
            let log = store
                .events_page(&EventFilter::within(tasker_domain::Within::Any), None, 100)
                .await
                .unwrap();
            assert_eq!(kept, log);
            // The slowest subscription's lag is the slow one's: it has looked at nothing.
            let head = log.last().map(|event| event.cursor().0);
            assert_eq!(feed.slowest_subscriber_lag(head), 30);
            assert!(
                slow.receiver.len() > 2,
                "the slow follower is further behind than the broadcast holds: it lost its place"
            );
            assert_eq!(take(&mut slow, 30).await, log, "{}", db.backend());
            assert_eq!(feed.slowest_subscriber_lag(head), 0, "both caught up");
            store.register_template(&template(30), false).await.unwrap();
            let next = take(&mut slow, 1).await;
            assert_eq!(next[0].payload["template"], "t30", "and then follows live");
            drop((slow, keeping_up));
            let follower = feed.follow(EventFilter::within(tasker_domain::Within::Any), None);
            assert_eq!(
                feed.inner.places.lock().unwrap().len(),
                1,
                "a new subscription leaves no ended one's place behind"
            );
            drop(follower);
            assert_eq!(feed.slowest_subscriber_lag(Some(1_000)), 0, "none follows");
        }
    }
}
