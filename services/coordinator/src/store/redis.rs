//! [`JobStore`] in Redis. Keys, with the configured TTL: `mip:coord:job:{id}` hash (`spec`: the encoded
//! `SubmitJobRequest`, `job`: the encoded `Job` with its task states, `status`, `traceparent` / `tracestate`: the
//! job span's W3C context), `mip:coord:job:{id}:results` hash (task index → encoded `JobImage`, written once per
//! task), `mip:coord:idem:{key}` → job id, `mip:coord:fence:{id}` (the job's fencing token, incremented by every
//! claim of its lease) and the `mip:coord:jobs` sorted set (job ids by creation time) for ListJobs. Without TTL:
//! the `mip:coord:active` set of unfinished job ids, and per running job the ownership lease
//! `mip:coord:lease:{id}` → the owner's instance id (PX = `coordinator.lease_ms`). A CancelJob that reaches a
//! replica not running the job records `mip:coord:cancel:{id}` for the owner.
//!
//! Every write of a job's state or results runs as one Lua script that first compares the job's fencing token
//! with the writer's: a newer token refuses the write ([`Write::Fenced`]); a missing one (Redis restarted empty)
//! fails it as a store error, so the writer keeps the job dirty until its lease renewal takes the job back and
//! writes it in full.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use mip_proto::v1::{Job, JobImage, SubmitJobRequest};
use prost::Message;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use super::{Fence, JobStore, NewClaim, Recorded, Renewal, StoredJob, Write, TRACE_FIELDS};
use crate::error::CoordinatorError;

/// How long one Redis command may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
const PREFIX: &str = "mip:coord";

/// KEYS: lease, fence[, idempotency key]. ARGV: job id, owner, lease ms, TTL s, prefix. Binds the idempotency key
/// to the job unless it names a job that exists (a `job` record) or is being created (a lease) — a key naming
/// neither was left by a submission whose writes timed out, and is taken over — then takes the lease and a new
/// token. Returns {token, job id}, or {0, the job the key names}.
const CLAIM_NEW: &str = r"
if KEYS[3] then
  local cur = redis.call('GET', KEYS[3])
  if cur and cur ~= ARGV[1] then
    if redis.call('HEXISTS', ARGV[5] .. ':job:' .. cur, 'job') == 1
       or redis.call('EXISTS', ARGV[5] .. ':lease:' .. cur) == 1 then
      return {0, cur}
    end
  end
  redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[4])
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
local t = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {t, ARGV[1]}
";

/// KEYS: lease, fence. ARGV: owner, lease ms, TTL s. Takes a lease nobody holds with a new token; 0 when it is
/// held (by anyone: a job this owner holds is running here, or about to be).
const CLAIM: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local t = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return t
";

/// KEYS: lease, fence per job. ARGV: owner, lease ms, TTL s, prefix, then job id, token per job. Per job: 1 held
/// (extended), 2 reclaimed (lapsed, nobody claimed it since, and it has not ended elsewhere), 0 lost.
const RENEW: &str = r"
local out = {}
for i = 1, #KEYS / 2 do
  local lk, fk = KEYS[2 * i - 1], KEYS[2 * i]
  local id, tok = ARGV[3 + 2 * i], ARGV[4 + 2 * i]
  local v = redis.call('GET', lk)
  local f = redis.call('GET', fk)
  if v == ARGV[1] and f == tok then
    redis.call('PEXPIRE', lk, ARGV[2])
    redis.call('EXPIRE', fk, ARGV[3])
    out[i] = 1
  elseif not v and (not f or f == tok)
         and (redis.call('SISMEMBER', ARGV[4] .. ':active', id) == 1
              or redis.call('EXISTS', ARGV[4] .. ':job:' .. id) == 0) then
    redis.call('SET', lk, ARGV[1], 'PX', ARGV[2])
    redis.call('SET', fk, tok, 'EX', ARGV[3])
    out[i] = 2
  else
    out[i] = 0
  end
end
return out
";

/// KEYS: lease, fence. ARGV: owner, token. Deletes the lease if still held with this token.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('GET', KEYS[2]) == ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// KEYS: job hash, fence, jobs index, active set. ARGV: token, TTL s, job id, created ms, final (0/1), then
/// field, value pairs. 1 written, 0 fenced, -1 no token (state lost).
const WRITE_JOB: &str = r"
local f = redis.call('GET', KEYS[2])
if not f then return -1 end
if f ~= ARGV[1] then return 0 end
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
if ARGV[5] == '1' then
  redis.call('SREM', KEYS[4], ARGV[3])
else
  redis.call('SADD', KEYS[4], ARGV[3])
end
return 1
";

/// KEYS: results hash, fence. ARGV: token, task index, image, TTL s. {1, ''} recorded, {2, first image} the task
/// had one, {0, ''} fenced, {-1, ''} no token.
const WRITE_RESULT: &str = r"
local f = redis.call('GET', KEYS[2])
if not f then return {-1, ''} end
if f ~= ARGV[1] then return {0, ''} end
if redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[3]) == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return {1, ''}
end
return {2, redis.call('HGET', KEYS[1], ARGV[2])}
";

fn key(kind: &str, job_id: &str) -> String {
    format!("{PREFIX}:{kind}:{job_id}")
}

/// The hash of a job's recorded images.
fn results_key(job_id: &str) -> String {
    format!("{PREFIX}:job:{job_id}:results")
}

fn err(e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Store(e.to_string())
}

fn lost(job_id: &str) -> CoordinatorError {
    CoordinatorError::Store(format!(
        "the store has lost job `{job_id}` (restarted empty?); it is written again once its lease is taken back"
    ))
}

async fn timed<T>(f: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, CoordinatorError> {
    match tokio::time::timeout(REDIS_TIMEOUT, f).await {
        Ok(r) => r.map_err(err),
        Err(_) => Err(CoordinatorError::Store(format!(
            "redis did not answer within {REDIS_TIMEOUT:?}"
        ))),
    }
}

struct Scripts {
    claim_new: Script,
    claim: Script,
    renew: Script,
    release: Script,
    write_job: Script,
    write_result: Script,
}

/// The Redis job store.
pub struct RedisStore {
    conn: ConnectionManager,
    ttl_secs: u64,
    scripts: Scripts,
}

impl RedisStore {
    /// Connects to `url` (bounded by the command timeout), trusting `ca` for `rediss://` when given.
    pub async fn connect(url: &str, ca: Option<&Path>, ttl: Duration) -> Result<Self, CoordinatorError> {
        let client = mip_common::redis_client::client(url, ca)
            .map_err(|e| CoordinatorError::invalid("redis", "must name a usable Redis", e))?;
        // One plain connection first, so that a refused handshake (an untrusted certificate, a wrong password) is
        // reported as itself rather than as the connection manager's timeout.
        timed(client.get_multiplexed_async_connection()).await?;
        Ok(Self {
            conn: timed(ConnectionManager::new(client)).await?,
            ttl_secs: ttl.as_secs().max(1),
            scripts: Scripts {
                claim_new: Script::new(CLAIM_NEW),
                claim: Script::new(CLAIM),
                renew: Script::new(RENEW),
                release: Script::new(RELEASE),
                write_job: Script::new(WRITE_JOB),
                write_result: Script::new(WRITE_RESULT),
            },
        })
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// One fenced write of the job hash (`fields`), the index and the active set.
    async fn write_fields(
        &self,
        fence: &Fence,
        job: &Job,
        fields: Vec<(String, Vec<u8>)>,
    ) -> Result<Write, CoordinatorError> {
        let mut inv = self.scripts.write_job.prepare_invoke();
        inv.key(key("job", &job.job_id))
            .key(key("fence", &job.job_id))
            .key(format!("{PREFIX}:jobs"))
            .key(format!("{PREFIX}:active"))
            .arg(fence.token)
            .arg(self.ttl_secs)
            .arg(&job.job_id)
            .arg(job.created_at_ms)
            .arg(u8::from(crate::status::is_final(job.status)));
        for (f, v) in fields {
            inv.arg(f).arg(v);
        }
        match timed(inv.invoke_async::<i64>(&mut self.conn())).await? {
            1 => Ok(Write::Done),
            0 => Ok(Write::Fenced),
            _ => Err(lost(&job.job_id)),
        }
    }

    async fn images(&self, job_id: &str) -> Result<Vec<JobImage>, CoordinatorError> {
        let all: HashMap<u32, Vec<u8>> = timed(self.conn().hgetall(results_key(job_id))).await?;
        let mut images = all
            .values()
            .map(|v| JobImage::decode(v.as_slice()).map_err(err))
            .collect::<Result<Vec<_>, _>>()?;
        images.sort_by_key(|i| i.task_index);
        Ok(images)
    }
}

/// The job hash fields of a state write.
fn state_fields(job: &Job) -> Vec<(String, Vec<u8>)> {
    let mut bare = job.clone();
    bare.images.clear();
    vec![
        ("job".into(), bare.encode_to_vec()),
        ("status".into(), job.status.to_string().into_bytes()),
    ]
}

#[tonic::async_trait]
impl JobStore for RedisStore {
    async fn claim_new(
        &self,
        job_id: &str,
        idempotency_key: Option<&str>,
        owner: &str,
        lease: Duration,
    ) -> Result<NewClaim, CoordinatorError> {
        let mut inv = self.scripts.claim_new.prepare_invoke();
        inv.key(key("lease", job_id)).key(key("fence", job_id));
        if let Some(k) = idempotency_key {
            inv.key(key("idem", k));
        }
        inv.arg(job_id)
            .arg(owner)
            .arg(lease.as_millis() as u64)
            .arg(self.ttl_secs)
            .arg(PREFIX);
        let (token, id): (u64, String) = timed(inv.invoke_async(&mut self.conn())).await?;
        Ok(if token == 0 {
            NewClaim::Existing(id)
        } else {
            NewClaim::Claimed(Fence {
                job_id: id,
                owner: owner.to_owned(),
                token,
            })
        })
    }

    async fn claim(&self, job_id: &str, owner: &str, lease: Duration) -> Result<Option<Fence>, CoordinatorError> {
        let mut inv = self.scripts.claim.prepare_invoke();
        inv.key(key("lease", job_id))
            .key(key("fence", job_id))
            .arg(owner)
            .arg(lease.as_millis() as u64)
            .arg(self.ttl_secs);
        let token: u64 = timed(inv.invoke_async(&mut self.conn())).await?;
        Ok((token > 0).then(|| Fence {
            job_id: job_id.to_owned(),
            owner: owner.to_owned(),
            token,
        }))
    }

    async fn renew(&self, fences: &[Fence], lease: Duration) -> Result<Vec<Renewal>, CoordinatorError> {
        let Some(first) = fences.first() else {
            return Ok(Vec::new());
        };
        let mut inv = self.scripts.renew.prepare_invoke();
        for f in fences {
            inv.key(key("lease", &f.job_id)).key(key("fence", &f.job_id));
        }
        inv.arg(&first.owner)
            .arg(lease.as_millis() as u64)
            .arg(self.ttl_secs)
            .arg(PREFIX);
        for f in fences {
            inv.arg(&f.job_id).arg(f.token);
        }
        let out: Vec<i64> = timed(inv.invoke_async(&mut self.conn())).await?;
        Ok(out
            .into_iter()
            .map(|v| match v {
                1 => Renewal::Held,
                2 => Renewal::Reclaimed,
                _ => Renewal::Lost,
            })
            .collect())
    }

    async fn release(&self, fence: &Fence) -> Result<(), CoordinatorError> {
        let mut inv = self.scripts.release.prepare_invoke();
        inv.key(key("lease", &fence.job_id))
            .key(key("fence", &fence.job_id))
            .arg(&fence.owner)
            .arg(fence.token);
        timed(inv.invoke_async::<i64>(&mut self.conn())).await?;
        Ok(())
    }

    async fn create(
        &self,
        fence: &Fence,
        job: &Job,
        spec: &SubmitJobRequest,
        trace: &[(String, String)],
    ) -> Result<Write, CoordinatorError> {
        let mut fields = vec![("spec".to_owned(), spec.encode_to_vec())];
        fields.extend(trace.iter().map(|(f, v)| (f.clone(), v.clone().into_bytes())));
        fields.extend(state_fields(job));
        self.write_fields(fence, job, fields).await
    }

    async fn write_job(&self, fence: &Fence, job: &Job) -> Result<Write, CoordinatorError> {
        self.write_fields(fence, job, state_fields(job)).await
    }

    async fn write_result(&self, fence: &Fence, image: &JobImage) -> Result<Recorded, CoordinatorError> {
        let mut inv = self.scripts.write_result.prepare_invoke();
        inv.key(results_key(&fence.job_id))
            .key(key("fence", &fence.job_id))
            .arg(fence.token)
            .arg(image.task_index)
            .arg(image.encode_to_vec())
            .arg(self.ttl_secs);
        let (code, first): (i64, Vec<u8>) = timed(inv.invoke_async(&mut self.conn())).await?;
        match code {
            1 => Ok(Recorded::New),
            2 => Ok(Recorded::Existing(Box::new(
                JobImage::decode(first.as_slice()).map_err(err)?,
            ))),
            0 => Ok(Recorded::Fenced),
            _ => Err(lost(&fence.job_id)),
        }
    }

    async fn active_ids(&self) -> Result<Vec<String>, CoordinatorError> {
        let ids: HashSet<String> = timed(self.conn().smembers(format!("{PREFIX}:active"))).await?;
        Ok(ids.into_iter().collect())
    }

    async fn forget_active(&self, job_id: &str) -> Result<(), CoordinatorError> {
        timed(self.conn().srem::<_, _, ()>(format!("{PREFIX}:active"), job_id)).await
    }

    async fn load_stored(&self, job_id: &str) -> Result<Option<StoredJob>, CoordinatorError> {
        let fields: HashMap<String, Vec<u8>> = timed(self.conn().hgetall(key("job", job_id))).await?;
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
        Ok(Some(StoredJob {
            spec,
            job,
            images: self.images(job_id).await?,
            trace,
        }))
    }

    async fn load_job(&self, job_id: &str, include_images: bool) -> Result<Option<Job>, CoordinatorError> {
        let raw: Option<Vec<u8>> = timed(self.conn().hget(key("job", job_id), "job")).await?;
        let Some(raw) = raw else {
            return Ok(None);
        };
        let mut job = Job::decode(raw.as_slice()).map_err(err)?;
        if include_images {
            job.images = self.images(job_id).await?;
        }
        Ok(Some(job))
    }

    async fn result_indices(&self, job_id: &str) -> Result<Vec<u32>, CoordinatorError> {
        let mut keys: Vec<u32> = timed(self.conn().hkeys(results_key(job_id))).await?;
        keys.sort_unstable();
        Ok(keys)
    }

    async fn load_results(&self, job_id: &str, indices: &[u32]) -> Result<Vec<JobImage>, CoordinatorError> {
        if indices.is_empty() {
            return Ok(Vec::new());
        }
        let k = results_key(job_id);
        let raw: Vec<Option<Vec<u8>>> =
            timed(redis::cmd("HMGET").arg(&k).arg(indices).query_async(&mut self.conn())).await?;
        raw.into_iter()
            .flatten()
            .map(|v| JobImage::decode(v.as_slice()).map_err(err))
            .collect()
    }

    async fn request_cancel(&self, job_id: &str) -> Result<(), CoordinatorError> {
        timed(self.conn().set_ex::<_, _, ()>(key("cancel", job_id), 1, self.ttl_secs)).await
    }

    async fn cancel_requested(&self, ids: &[String]) -> Result<Vec<bool>, CoordinatorError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| key("cancel", id)).collect();
        let flags: Vec<Option<String>> = timed(redis::cmd("MGET").arg(&keys).query_async(&mut self.conn())).await?;
        Ok(flags.into_iter().map(|f| f.is_some()).collect())
    }

    async fn list_job_ids(&self, offset: usize, count: usize) -> Result<Vec<String>, CoordinatorError> {
        let stop = (offset + count).saturating_sub(1) as isize;
        timed(self.conn().zrevrange(format!("{PREFIX}:jobs"), offset as isize, stop)).await
    }
}
