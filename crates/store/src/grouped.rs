//! Group commit for single task creations: calls that arrive while another creation is being
//! written wait, and are then written together in one transaction. One commit (and one
//! command per table) serves many callers, so concurrent `createTask` calls scale with their
//! number instead of queueing for the database one commit each. A lone call is written at
//! once, as before.

use crate::records::TaskRecord;
use crate::tasks::TaskRows;
use crate::{Error, Result, Store};
use tokio::sync::oneshot::{self, error::TryRecvError};
use tracing::Instrument as _;

/// At most this many tasks go in one grouped transaction.
const MAX_GROUP: usize = 256;

/// Creations waiting to be written, and the turn to write them.
#[derive(Default)]
pub(crate) struct CreationQueue {
    waiting: std::sync::Mutex<Vec<Waiting>>,
    /// Held by the call writing a group; the others wait for it (in arrival order).
    writer: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for CreationQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreationQueue").finish_non_exhaustive()
    }
}

/// One waiting creation and where its outcome goes.
struct Waiting {
    rows: TaskRows,
    answer: oneshot::Sender<Result<TaskRecord>>,
}

/// A creation whose writer went away without answering (it cannot commit after that).
fn not_written() -> Error {
    Error::Conflict("the task was not written; send the request again".into())
}

impl CreationQueue {
    fn push(&self, waiting: Waiting) {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(waiting);
    }

    /// The oldest waiting creations, at most [`MAX_GROUP`].
    fn take_group(&self) -> Vec<Waiting> {
        let mut waiting = self
            .waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = waiting.len().min(MAX_GROUP);
        waiting.drain(..count).collect()
    }
}

impl Store {
    /// Writes one new task's rows, with whatever other creations wait at the same time, and
    /// answers when its own transaction has committed (or failed).
    pub(crate) async fn insert_task_grouped(&self, rows: TaskRows) -> Result<TaskRecord> {
        let (answer, mut answered) = oneshot::channel();
        self.creations.push(Waiting { rows, answer });
        let _turn = self.creations.writer.lock().await;
        loop {
            // A writer before this one may have taken this creation along.
            match answered.try_recv() {
                Ok(result) => return result,
                Err(TryRecvError::Closed) => return Err(not_written()),
                Err(TryRecvError::Empty) => {}
            }
            let group = self.creations.take_group();
            if group.is_empty() {
                return Err(not_written());
            }
            // The group is written by a task of its own: a caller that goes away (a client
            // closing its connection) must not cancel a transaction others wait on. Its
            // statements join the trace of the call that writes it.
            let store = self.clone();
            let writing = async move { store.write_group(group).await };
            if tokio::spawn(writing.instrument(tracing::Span::current()))
                .await
                .is_err()
            {
                return Err(not_written());
            }
        }
    }

    /// Writes a group in one transaction and answers each creation. When the group is
    /// refused (a repeated idempotency key, a failing database), each creation is written
    /// alone, so that each gets its own outcome and one bad request costs the others nothing.
    async fn write_group(&self, group: Vec<Waiting>) {
        let (rows, answers): (Vec<TaskRows>, Vec<_>) = group
            .into_iter()
            .map(|waiting| (waiting.rows, waiting.answer))
            .unzip();
        if rows.len() > 1
            && let Ok(records) = self.insert_task_rows(rows.clone()).await
            && records.len() == answers.len()
        {
            for (answer, record) in answers.into_iter().zip(records) {
                // A caller that went away no longer listens; its task is written all the same.
                let _ = answer.send(Ok(record));
            }
            return;
        }
        for (rows, answer) in rows.into_iter().zip(answers) {
            let result = self
                .insert_task_rows(vec![rows])
                .await
                .and_then(|mut records| records.pop().ok_or_else(not_written));
            let _ = answer.send(result);
        }
    }
}
