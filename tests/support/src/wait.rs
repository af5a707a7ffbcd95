//! Waiting for a condition with a timeout.

use std::future::Future;
use std::time::Duration;

/// What a polled condition returns: `bool` (ready when true) or `Option<T>` (ready with `T`).
pub trait Condition {
    type Output;
    fn ready(self) -> Option<Self::Output>;
}

impl Condition for bool {
    type Output = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Condition for Option<T> {
    type Output = T;
    fn ready(self) -> Option<T> {
        self
    }
}

/// The condition did not hold within the timeout.
#[derive(Debug, thiserror::Error)]
#[error("{what} did not happen within {timeout:?} ({attempts} checks)")]
pub struct WaitError {
    pub what: String,
    pub timeout: Duration,
    pub attempts: u32,
}

/// Polls `check` until it is ready or `timeout` passes (first check at once, then every 100 ms
/// growing to 1 s). The last check starts before the deadline; a check that hangs is cut off
/// at the deadline.
pub async fn wait_for<F, Fut, C>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> Result<C::Output, WaitError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = C>,
    C: Condition,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(100);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        if let Ok(result) = tokio::time::timeout_at(deadline, check()).await
            && let Some(value) = result.ready()
        {
            return Ok(value);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(WaitError {
                what: what.to_string(),
                timeout,
                attempts,
            });
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_the_value_once_ready() {
        let calls = AtomicU32::new(0);
        let got = wait_for("third call", Duration::from_secs(5), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            (n >= 3).then_some(n)
        })
        .await
        .expect("ready on the third call");
        assert_eq!(got, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn times_out_with_the_description() {
        let err = wait_for("never", Duration::from_secs(3), || async { false })
            .await
            .expect_err("a false condition must time out");
        assert_eq!(err.what, "never");
        assert!(err.attempts >= 2, "polled {} times", err.attempts);
    }

    #[tokio::test(start_paused = true)]
    async fn cuts_off_a_hanging_check() {
        let err = wait_for("hang", Duration::from_secs(2), || async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            true
        })
        .await
        .expect_err("a hanging check must time out");
        assert_eq!(err.attempts, 1);
    }
}
