//! Limits per token, counted in this coordinator process (each replica counts its own): requests per
//! second for submits and pushes (a token bucket per token, `governor`), and uploads in progress.
//! A refusal is RESOURCE_EXHAUSTED naming the limit and its setting.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::auth::Principal;
use crate::config::CoordinatorConfig;
use crate::error::{Error, Result};

/// The limits of one coordinator process.
pub struct Quotas {
    rate: Option<DefaultKeyedRateLimiter<String>>,
    per_second: u32,
    max_uploads: usize,
    uploads: Arc<Mutex<HashMap<String, usize>>>,
}

/// An upload slot; given back when dropped.
pub struct UploadSlot {
    token: String,
    uploads: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut map = self.uploads.lock().expect("upload counts");
        if let Some(n) = map.get_mut(&self.token) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.token);
            }
        }
    }
}

impl Quotas {
    /// The limits `config` sets (0: no limit).
    pub fn new(config: &CoordinatorConfig) -> Self {
        let per_second = config.max_requests_per_second_per_token;
        Self {
            rate: NonZeroU32::new(per_second).map(|n| {
                // Bursts of up to twice the rate, as a CI job submitting a sweep does.
                let burst = n.saturating_mul(NonZeroU32::new(2).expect("2"));
                RateLimiter::keyed(Quota::per_second(n).allow_burst(burst))
            }),
            per_second,
            max_uploads: config.max_uploads_per_token as usize,
            uploads: Default::default(),
        }
    }

    /// Counts one submit or push request of `who`.
    pub fn request(&self, who: &Principal) -> Result<()> {
        match &self.rate {
            Some(r) if r.check_key(&who.token_id).is_err() => {
                Err(Error::ResourceExhausted(format!(
                    "token '{}' is over its limit of {} submit and push requests per second \
                     (setting max_requests_per_second_per_token); retry in a moment",
                    who.name, self.per_second
                )))
            }
            _ => Ok(()),
        }
    }

    /// A slot for one upload of `who`, held while the upload streams.
    pub fn upload(&self, who: &Principal) -> Result<UploadSlot> {
        let mut map = self.uploads.lock().expect("upload counts");
        let n = map.entry(who.token_id.clone()).or_insert(0);
        if self.max_uploads > 0 && *n >= self.max_uploads {
            return Err(Error::ResourceExhausted(format!(
                "token '{}' has {} uploads in progress, its limit (setting max_uploads_per_token); \
                 wait for one to finish",
                who.name, self.max_uploads
            )));
        }
        *n += 1;
        Ok(UploadSlot {
            token: who.token_id.clone(),
            uploads: self.uploads.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn who(id: &str) -> Principal {
        Principal {
            token_id: id.into(),
            name: format!("name-{id}"),
            role: Role::Submitter,
            agent_id: String::new(),
        }
    }

    #[test]
    fn limits_count_per_token_and_name_the_setting() {
        let q = Quotas::new(&CoordinatorConfig {
            max_requests_per_second_per_token: 5,
            max_uploads_per_token: 2,
            ..Default::default()
        });
        // A burst of twice the rate passes, the next is refused; another token has its own bucket.
        for _ in 0..10 {
            q.request(&who("a")).unwrap();
        }
        let e = q.request(&who("a")).unwrap_err().to_string();
        assert!(
            e.contains("name-a") && e.contains("max_requests_per_second_per_token"),
            "{e}"
        );
        q.request(&who("b")).unwrap();
        // Two uploads at once, not three; a finished one frees its slot.
        let one = q.upload(&who("a")).unwrap();
        let _two = q.upload(&who("a")).unwrap();
        let e = q.upload(&who("a")).err().unwrap().to_string();
        assert!(e.contains("max_uploads_per_token"), "{e}");
        let _other = q.upload(&who("b")).unwrap();
        drop(one);
        let _three = q.upload(&who("a")).unwrap();
        // 0: no limit.
        let open = Quotas::new(&CoordinatorConfig {
            max_requests_per_second_per_token: 0,
            max_uploads_per_token: 0,
            ..Default::default()
        });
        for _ in 0..1000 {
            open.request(&who("a")).unwrap();
        }
    }
}
