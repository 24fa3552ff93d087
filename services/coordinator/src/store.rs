//! Job state in Redis (optional: without a URL everything stays in memory). Keys, with the configured TTL:
//! `mip:coord:job:{id}` hash (`spec`: the encoded `SubmitJobRequest`, `job`: the encoded `Job` with its task
//! states, rewritten on every task state change, `status`, `traceparent` / `tracestate`: the job span's W3C
//! context), `mip:coord:job:{id}:results` hash (task index → encoded `JobImage`, written with HSETNX so each image
//! is recorded once), `mip:coord:idem:{key}` → job id, and the `mip:coord:jobs` sorted set (job ids by creation
//! time) for ListJobs. Without TTL: the `mip:coord:active` set of unfinished job ids, and per running job the
//! ownership lease `mip:coord:lease:{id}` → the owning coordinator's instance id (PX = `coordinator.lease_ms`).
//! A CancelJob that reaches a replica not running the job records `mip:coord:cancel:{id}` (with the TTL) for the
//! owner, which applies it at its next lease renewal (or on resuming the job).

use std::collections::{HashMap, HashSet};
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

/// Renews the leases in KEYS that still hold ARGV[1] (for ARGV[2] ms); one 1/0 per key.
const RENEW: &str = r"
local out = {}
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  local id = ARGV[3 + i]
  if v == ARGV[1] then
    redis.call('PEXPIRE', k, ARGV[2])
    out[i] = 1
  elseif not v and (redis.call('SISMEMBER', ARGV[3] .. ':active', id) == 1
                    or redis.call('EXISTS', ARGV[3] .. ':job:' .. id) == 0) then
    redis.call('SET', k, ARGV[1], 'PX', ARGV[2])
    out[i] = 2
  else
    out[i] = 0
  end
end
return out
";

/// Binds the idempotency key KEYS[1] to job ARGV[1] (TTL ARGV[2] s) unless it names a job that exists or is being
/// created; returns the job id the key names afterwards. A key naming a job with neither a state record (`job`
/// field) nor a lease is taken over: a submission whose writes timed out here but reached Redis later leaves such
/// a key behind once its lease lapses. The new job's lease (owner ARGV[4], ARGV[5] ms) is taken in the same step, so no other replica can
/// see the key without a lease. ARGV[3] is the key prefix.
const CLAIM_IDEM: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then
  if redis.call('HEXISTS', ARGV[3] .. ':job:' .. cur, 'job') == 1 or redis.call('EXISTS', ARGV[3] .. ':lease:' .. cur) == 1 then
    return cur
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SET', ARGV[3] .. ':lease:' .. ARGV[1], ARGV[4], 'PX', ARGV[5])
return ARGV[1]
";

/// Takes the lease KEYS[1] for ARGV[1] (PX ARGV[2]) when nobody holds it, or extends it when ARGV[1] does.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Deletes the lease KEYS[1] if it still holds ARGV[1].
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// A stored unfinished job, as needed to resume it.
#[derive(Debug, Clone)]
pub struct StoredJob {
    pub spec: SubmitJobRequest,
    pub job: Job,
    pub images: Vec<JobImage>,
    /// The job span's W3C fields (`traceparent`, `tracestate`), empty when it had none.
    pub trace: Vec<(String, String)>,
}

/// The trace fields kept in the job hash.
pub const TRACE_FIELDS: [&str; 2] = ["traceparent", "tracestate"];

/// What renewing one lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours, extended.
    Held,
    /// It had lapsed (Redis unreachable for longer than the lease, or restarted empty) and nobody took it: ours
    /// again, and the job's state must be written in full.
    Reclaimed,
    /// Someone else's, or the job ended elsewhere.
    Lost,
}

fn lease_key(job_id: &str) -> String {
    format!("{PREFIX}:lease:{job_id}")
}

fn cancel_key(job_id: &str) -> String {
    format!("{PREFIX}:cancel:{job_id}")
}

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

    /// Binds `key` to `job_id` unless it names a job that exists (see [`CLAIM_IDEM`]); returns the job id the key
    /// names. When that is `job_id`, its lease is `owner`'s for `lease`.
    pub async fn claim_idempotency(
        &self,
        key: &str,
        job_id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<String, CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            let mut m = self.idem.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            return Ok(m.entry(key.to_owned()).or_insert_with(|| job_id.to_owned()).clone());
        };
        let script = redis::Script::new(CLAIM_IDEM);
        let mut inv = script.prepare_invoke();
        inv.key(format!("{PREFIX}:idem:{key}"))
            .arg(job_id)
            .arg(self.ttl_secs)
            .arg(PREFIX)
            .arg(owner)
            .arg(lease.as_millis() as u64);
        timed(inv.invoke_async(&mut c)).await
    }

    /// Writes the job's spec and trace fields, then [`save_job`](Self::save_job).
    pub async fn save_new_job(
        &self,
        job: &Job,
        spec: &SubmitJobRequest,
        trace: &[(String, String)],
    ) -> Result<(), CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            return Ok(());
        };
        let k = format!("{PREFIX}:job:{}", job.job_id);
        let mut fields: Vec<(String, Vec<u8>)> = vec![("spec".into(), spec.encode_to_vec())];
        fields.extend(trace.iter().map(|(f, v)| (f.clone(), v.clone().into_bytes())));
        timed(c.hset_multiple::<_, _, _, ()>(&k, &fields)).await?;
        self.save_job(job).await
    }

    /// Writes the job (without images), indexes it, and keeps it in `active` until it ends.
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
        let active = format!("{PREFIX}:active");
        if crate::job::is_final(job.status) {
            pipe.srem(active, &job.job_id).ignore();
        } else {
            pipe.sadd(active, &job.job_id).ignore();
        }
        timed(pipe.query_async::<()>(&mut c)).await
    }

    /// Records one image of a job unless one is recorded for its task already: None when this one was recorded
    /// (or there is no store), else the image recorded first.
    pub async fn save_result(&self, job_id: &str, image: &JobImage) -> Result<Option<JobImage>, CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            return Ok(None);
        };
        let k = format!("{PREFIX}:job:{job_id}:results");
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_nx(&k, image.task_index, image.encode_to_vec())
            .expire(&k, self.ttl_secs as i64)
            .ignore();
        let (set,): (bool,) = timed(pipe.query_async(&mut c)).await?;
        if set {
            return Ok(None);
        }
        let raw: Option<Vec<u8>> = timed(c.hget(&k, image.task_index)).await?;
        match raw {
            Some(raw) => Ok(Some(JobImage::decode(raw.as_slice()).map_err(err)?)),
            None => Ok(None),
        }
    }

    /// Ids of the unfinished jobs (of any coordinator).
    pub async fn active_ids(&self) -> Result<Vec<String>, CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            return Ok(Vec::new());
        };
        let ids: HashSet<String> = timed(c.smembers(format!("{PREFIX}:active"))).await?;
        Ok(ids.into_iter().collect())
    }

    /// Drops a job from `active` (its state expired or it ended).
    pub async fn forget_active(&self, job_id: &str) -> Result<(), CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            return Ok(());
        };
        timed(c.srem::<_, _, ()>(format!("{PREFIX}:active"), job_id)).await
    }

    /// Takes the lease of a job nobody holds (or extends `owner`'s own); true when it is now `owner`'s.
    pub async fn claim_lease(&self, job_id: &str, owner: &str, ttl: Duration) -> Result<bool, CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            return Ok(true);
        };
        let script = redis::Script::new(CLAIM);
        let mut inv = script.prepare_invoke();
        inv.key(lease_key(job_id)).arg(owner).arg(ttl.as_millis() as u64);
        let held: i64 = timed(inv.invoke_async(&mut c)).await?;
        Ok(held == 1)
    }

    /// Extends the leases `owner` still holds, and takes back a lease that lapsed while Redis could not be reached
    /// if nobody else took it and the job has not ended elsewhere (it is still active, or Redis lost it); one
    /// [`Renewal`] per id.
    pub async fn renew_leases(
        &self,
        ids: &[String],
        owner: &str,
        ttl: Duration,
    ) -> Result<Vec<Renewal>, CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            return Ok(vec![Renewal::Held; ids.len()]);
        };
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let script = redis::Script::new(RENEW);
        let mut inv = script.prepare_invoke();
        for id in ids {
            inv.key(lease_key(id));
        }
        inv.arg(owner).arg(ttl.as_millis() as u64).arg(PREFIX);
        for id in ids {
            inv.arg(id);
        }
        let out: Vec<i64> = timed(inv.invoke_async(&mut c)).await?;
        Ok(out
            .into_iter()
            .map(|v| match v {
                1 => Renewal::Held,
                2 => Renewal::Reclaimed,
                _ => Renewal::Lost,
            })
            .collect())
    }

    /// Gives a lease up if `owner` still holds it.
    pub async fn release_lease(&self, job_id: &str, owner: &str) -> Result<(), CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            return Ok(());
        };
        let script = redis::Script::new(RELEASE);
        timed(script.key(lease_key(job_id)).arg(owner).invoke_async::<i64>(&mut c)).await?;
        Ok(())
    }

    /// Everything needed to resume a job; None when its state is gone.
    pub async fn load_stored(&self, job_id: &str) -> Result<Option<StoredJob>, CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            return Ok(None);
        };
        let k = format!("{PREFIX}:job:{job_id}");
        let fields: HashMap<String, Vec<u8>> = timed(c.hgetall(&k)).await?;
        let (Some(spec), Some(job)) = (fields.get("spec"), fields.get("job")) else {
            return Ok(None);
        };
        let spec = SubmitJobRequest::decode(spec.as_slice()).map_err(err)?;
        let job = Job::decode(job.as_slice()).map_err(err)?;
        let trace = TRACE_FIELDS
            .iter()
            .filter_map(|f| {
                let v = String::from_utf8_lossy(fields.get(*f)?).into_owned();
                (!v.is_empty()).then(|| ((*f).to_owned(), v))
            })
            .collect();
        let images = self.load_images(&mut c, job_id).await?;
        Ok(Some(StoredJob {
            spec,
            job,
            images,
            trace,
        }))
    }

    async fn load_images(&self, c: &mut ConnectionManager, job_id: &str) -> Result<Vec<JobImage>, CoordinatorError> {
        let all: HashMap<u32, Vec<u8>> = timed(c.hgetall(format!("{PREFIX}:job:{job_id}:results"))).await?;
        let mut images = all
            .values()
            .map(|v| JobImage::decode(v.as_slice()).map_err(err))
            .collect::<Result<Vec<_>, _>>()?;
        images.sort_by_key(|i| i.task_index);
        Ok(images)
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
            job.images = self.load_images(&mut c, job_id).await?;
        }
        Ok(Some(job))
    }

    /// Records a cancel request for the replica that runs the job (kept for the job TTL).
    pub async fn request_cancel(&self, job_id: &str) -> Result<(), CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            return Ok(());
        };
        timed(c.set_ex::<_, _, ()>(cancel_key(job_id), 1, self.ttl_secs)).await
    }

    /// One flag per id: whether a cancel request is recorded for that job.
    pub async fn cancel_requested(&self, ids: &[String]) -> Result<Vec<bool>, CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            return Ok(vec![false; ids.len()]);
        };
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| cancel_key(id)).collect();
        let flags: Vec<Option<String>> = timed(redis::cmd("MGET").arg(&keys).query_async(&mut c)).await?;
        Ok(flags.into_iter().map(|f| f.is_some()).collect())
    }

    /// The task indices with a recorded image, in order.
    pub async fn result_indices(&self, job_id: &str) -> Result<Vec<u32>, CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            return Ok(Vec::new());
        };
        let mut keys: Vec<u32> = timed(c.hkeys(format!("{PREFIX}:job:{job_id}:results"))).await?;
        keys.sort_unstable();
        Ok(keys)
    }

    /// The recorded images of tasks `indices` (those without one are left out).
    pub async fn load_results(&self, job_id: &str, indices: &[u32]) -> Result<Vec<JobImage>, CoordinatorError> {
        let Some(mut c) = self.conn.clone() else {
            return Ok(Vec::new());
        };
        if indices.is_empty() {
            return Ok(Vec::new());
        }
        let k = format!("{PREFIX}:job:{job_id}:results");
        let raw: Vec<Option<Vec<u8>>> = timed(redis::cmd("HMGET").arg(&k).arg(indices).query_async(&mut c)).await?;
        raw.into_iter()
            .flatten()
            .map(|v| JobImage::decode(v.as_slice()).map_err(err))
            .collect()
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
