//! Parsing the identifiers and cursors clients send back.

use crate::error::ApiError;
use async_graphql::ID;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tasker_store::EventCursor;
use uuid::Uuid;

/// A record's id as GraphQL shows it.
pub fn id(uuid: Uuid) -> ID {
    ID::from(uuid.to_string())
}

/// Object ids are UUIDv7 strings.
pub fn parse_id(id: &ID, field: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id.as_str()).map_err(|_| {
        ApiError::invalid(
            field,
            format!(
                "{:?} is not a valid id (expected a UUID)",
                shorten(id.as_str())
            ),
        )
    })
}

const TASK_CURSOR_PREFIX: &str = "task:";

/// An opaque cursor for a position in a task listing.
pub fn task_cursor(id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{TASK_CURSOR_PREFIX}{id}"))
}

/// Reads a cursor made by [`task_cursor`]; anything else is a validation error.
pub fn parse_task_cursor(cursor: &str) -> Result<Uuid, ApiError> {
    let invalid = || {
        ApiError::invalid(
            "after",
            "malformed cursor: pass the endCursor or an edge cursor of a previous page",
        )
    };
    let id = cursor_body(cursor, TASK_CURSOR_PREFIX).ok_or_else(invalid)?;
    Uuid::parse_str(&id).map_err(|_| invalid())
}

/// What an opaque cursor of this kind (`prefix`) holds; `None` for anything else.
fn cursor_body(cursor: &str, prefix: &str) -> Option<String> {
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(cursor).ok()?).ok()?;
    text.strip_prefix(prefix).map(str::to_owned)
}

fn shorten(text: &str) -> String {
    text.chars().take(64).collect()
}

const EVENT_CURSOR_PREFIX: &str = "ev2:";

/// The opaque cursor of an event.
pub fn event_cursor(cursor: EventCursor) -> String {
    URL_SAFE_NO_PAD.encode(format!("{EVENT_CURSOR_PREFIX}{}", cursor.0))
}

/// Reads a cursor made by [`event_cursor`] from the argument `field`; anything else is a
/// validation error.
pub fn parse_event_cursor(text: &str, field: &str) -> Result<EventCursor, ApiError> {
    let invalid = || {
        ApiError::invalid(
            field,
            "malformed event cursor: pass the cursor of an event you received",
        )
    };
    let number = cursor_body(text, EVENT_CURSOR_PREFIX).ok_or_else(invalid)?;
    number.parse().map(EventCursor).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_cursors_round_trip_and_foreign_ones_are_refused() {
        let cursor = EventCursor(42);
        assert_eq!(
            parse_event_cursor(&event_cursor(cursor), "after").unwrap(),
            cursor
        );
        let task = task_cursor(Uuid::now_v7());
        for bad in ["", "%%", task.as_str(), &URL_SAFE_NO_PAD.encode("ev2:x")] {
            assert_eq!(
                parse_event_cursor(bad, "after").unwrap_err().code(),
                "VALIDATION_FAILED"
            );
        }
    }

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        let id = Uuid::now_v7();
        assert_eq!(parse_task_cursor(&task_cursor(id)).unwrap(), id);
        for bad in [
            "",
            "!!!",
            "dGFzazpub3QtYS11dWlk",
            &URL_SAFE_NO_PAD.encode(format!("step:{id}")),
        ] {
            assert_eq!(
                parse_task_cursor(bad).unwrap_err().code(),
                "VALIDATION_FAILED"
            );
        }
    }

    #[test]
    fn ids_must_be_uuids() {
        assert!(parse_id(&ID::from(Uuid::now_v7().to_string()), "id").is_ok());
        let err = parse_id(&ID::from("42"), "id").unwrap_err();
        assert_eq!(err.code(), "VALIDATION_FAILED");
        assert!(err.to_string().contains("not a valid id"));
    }
}
