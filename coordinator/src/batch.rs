//! Batching of queued work: one database transaction for what arrives together.

use std::time::Duration;

use tokio::sync::mpsc;

/// Takes the first item, then whatever else arrives within `linger`, up to `max`: a few milliseconds
/// of waiting turns a trickle from many agents into one transaction instead of dozens.
pub async fn next_batch<T>(
    rx: &mut mpsc::Receiver<T>,
    max: usize,
    linger: Duration,
) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(item)) => batch.push(item),
                    _ => break,
                }
            }
        }
    }
    Some(batch)
}
