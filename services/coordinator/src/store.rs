//! Job state in Redis (optional: without a URL everything stays in memory). Keys, all with the configured TTL:
//! `mip:coord:job:{id}` hash (`spec`: the encoded `SubmitJobRequest`, `job`: the encoded `Job` with its task
//! states, `status`), `mip:coord:job:{id}:results`
//! hash (task index → encoded `JobImage`), `mip:coord:idem:{key}` → job id, and the `mip:coord:jobs` sorted set
//! (job ids by creation time) for ListJobs.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use mip_proto::v1::{Job, JobImage, SubmitJobRequest};
use prost::Message;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use crate::error::CoordinatorError;

/// How long one Redis command may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
const PREFIX: &str = "mip:coord";

/// The job store.
pub struct Store {
    conn: Option<ConnectionManager>,
    ttl_secs: u64,
    idem: Mutex<HashMap<String, String>>,
}

fn err(e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Store(e.to_string())
}

async fn timed<T>(f: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, CoordinatorError> {
    match tokio::time::timeout(REDIS_TIMEOUT, f).await {
        Ok(r) => r.map_err(err),
        Err(_) => Err(CoordinatorError::Store(format!(
            "redis did not answer within {REDIS_TIMEOUT:?}"
        ))),
    }
}

impl Store {
    /// Connects to `url` (None = memory only).
    pub async fn connect(url: Option<&str>, ttl: Duration) -> Result<Self, CoordinatorError> {
        let conn = match url {
            Some(u) => {
                let client =
                    redis::Client::open(u).map_err(|e| CoordinatorError::invalid("redis.url", e.to_string(), u))?;
                Some(timed(ConnectionManager::new(client)).await?)
            }
            None => None,
        };
        Ok(Self {
            conn,
            ttl_secs: ttl.as_secs().max(1),
            idem: Mutex::new(HashMap::new()),
        })
    }

    pub fn persistent(&self) -> bool {
        self.conn.is_some()
    }

    /// Binds `key` to `job_id` unless it is bound already; returns the job id the key names.
    pub async fn claim_idempotency(&self, key: &str, job_id: &str) -> Result<String, CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            let mut m = self.idem.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            return Ok(m.entry(key.to_owned()).or_insert_with(|| job_id.to_owned()).clone());
        };
        let k = format!("{PREFIX}:idem:{key}");
        let opts = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(redis::SetExpiry::EX(self.ttl_secs));
        let set: Option<String> = timed(c.set_options(&k, job_id, opts)).await?;
        if set.is_some() {
            return Ok(job_id.to_owned());
        }
        let existing: Option<String> = timed(c.get(&k)).await?;
        Ok(existing.unwrap_or_else(|| job_id.to_owned()))
    }

    /// Writes the job's spec, then [`save_job`](Self::save_job).
    pub async fn save_new_job(&self, job: &Job, spec: &SubmitJobRequest) -> Result<(), CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            return Ok(());
        };
        let k = format!("{PREFIX}:job:{}", job.job_id);
        timed(c.hset::<_, _, _, ()>(&k, "spec", spec.encode_to_vec())).await?;
        self.save_job(job).await
    }

    /// Writes the job (without images) and indexes it.
    pub async fn save_job(&self, job: &Job) -> Result<(), CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            return Ok(());
        };
        let mut bare = job.clone();
        bare.images.clear();
        let k = format!("{PREFIX}:job:{}", job.job_id);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset(&k, "job", bare.encode_to_vec())
            .ignore()
            .hset(&k, "status", job.status)
            .ignore()
            .expire(&k, self.ttl_secs as i64)
            .ignore()
            .zadd(format!("{PREFIX}:jobs"), &job.job_id, job.created_at_ms)
            .ignore();
        timed(pipe.query_async::<()>(&mut c)).await
    }

    /// Stores one image of a job.
    pub async fn save_result(&self, job_id: &str, image: &JobImage) -> Result<(), CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            return Ok(());
        };
        let k = format!("{PREFIX}:job:{job_id}:results");
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset(&k, image.task_index, image.encode_to_vec())
            .ignore()
            .expire(&k, self.ttl_secs as i64)
            .ignore();
        timed(pipe.query_async::<()>(&mut c)).await
    }

    /// Reads a stored job (and its images when asked).
    pub async fn load_job(&self, job_id: &str, include_images: bool) -> Result<Option<Job>, CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            return Ok(None);
        };
        let raw: Option<Vec<u8>> = timed(c.hget(format!("{PREFIX}:job:{job_id}"), "job")).await?;
        let Some(raw) = raw else {
            return Ok(None);
        };
        let mut job = Job::decode(raw.as_slice()).map_err(err)?;
        if include_images {
            let all: HashMap<u32, Vec<u8>> = timed(c.hgetall(format!("{PREFIX}:job:{job_id}:results"))).await?;
            let mut images = all
                .values()
                .map(|v| JobImage::decode(v.as_slice()).map_err(err))
                .collect::<Result<Vec<_>, _>>()?;
            images.sort_by_key(|i| i.task_index);
            job.images = images;
        }
        Ok(Some(job))
    }

    /// Job ids, newest first, `count` from `offset`.
    pub async fn list_job_ids(&self, offset: usize, count: usize) -> Result<Vec<String>, CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            return Ok(Vec::new());
        };
        let stop = (offset + count).saturating_sub(1) as isize;
        timed(c.zrevrange(format!("{PREFIX}:jobs"), offset as isize, stop)).await
    }
}
