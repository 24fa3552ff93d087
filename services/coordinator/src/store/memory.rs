//! [`JobStore`] in this process's memory, for a coordinator without Redis: one coordinator owns every job, so
//! leases always hold and fences never refuse, and nothing is left to resume after it stops. Finished jobs are
//! kept for GetJob / ListJobs up to [`MAX_JOBS`], oldest forgotten first.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mip_proto::v1::{Job, JobImage, SubmitJobRequest};

use super::{Fence, JobStore, NewClaim, Recorded, Renewal, StoredJob, Write};
use crate::error::CoordinatorError;
use crate::status::is_final;

/// Jobs kept (unfinished ones always are).
pub const MAX_JOBS: usize = 10_000;

#[derive(Default)]
struct State {
    jobs: HashMap<String, Job>,
    results: HashMap<String, BTreeMap<u32, JobImage>>,
    /// Job ids in creation order.
    order: VecDeque<String>,
    idempotency: HashMap<String, String>,
    cancels: HashSet<String>,
}

impl State {
    /// Forgets the oldest finished jobs beyond [`MAX_JOBS`].
    fn evict(&mut self) {
        let mut excess = self.jobs.len().saturating_sub(MAX_JOBS);
        if excess == 0 {
            return;
        }
        let jobs = &mut self.jobs;
        let results = &mut self.results;
        self.order.retain(|id| {
            if excess > 0 && jobs.get(id).is_none_or(|j| is_final(j.status)) {
                jobs.remove(id);
                results.remove(id);
                excess -= 1;
                return false;
            }
            true
        });
        self.idempotency.retain(|_, id| jobs.contains_key(id));
    }
}

/// The in-memory job store.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn fence(job_id: &str, owner: &str) -> Fence {
    Fence {
        job_id: job_id.to_owned(),
        owner: owner.to_owned(),
        token: 1,
    }
}

#[tonic::async_trait]
impl JobStore for MemoryStore {
    async fn claim_new(
        &self,
        job_id: &str,
        idempotency_key: Option<&str>,
        owner: &str,
        _lease: Duration,
    ) -> Result<NewClaim, CoordinatorError> {
        if let Some(k) = idempotency_key {
            let mut s = self.lock();
            let bound = s.idempotency.entry(k.to_owned()).or_insert_with(|| job_id.to_owned());
            if bound != job_id {
                return Ok(NewClaim::Existing(bound.clone()));
            }
        }
        Ok(NewClaim::Claimed(fence(job_id, owner)))
    }

    async fn claim(&self, job_id: &str, owner: &str, _lease: Duration) -> Result<Option<Fence>, CoordinatorError> {
        Ok(Some(fence(job_id, owner)))
    }

    async fn renew(&self, fences: &[Fence], _lease: Duration) -> Result<Vec<Renewal>, CoordinatorError> {
        Ok(vec![Renewal::Held; fences.len()])
    }

    async fn release(&self, _fence: &Fence) -> Result<(), CoordinatorError> {
        Ok(())
    }

    async fn create(
        &self,
        fence: &Fence,
        job: &Job,
        _spec: &SubmitJobRequest,
        _trace: &[(String, String)],
    ) -> Result<Write, CoordinatorError> {
        self.write_job(fence, job).await
    }

    async fn write_job(&self, _fence: &Fence, job: &Job) -> Result<Write, CoordinatorError> {
        let mut bare = job.clone();
        bare.images.clear();
        let mut s = self.lock();
        if !s.jobs.contains_key(&job.job_id) {
            s.order.push_back(job.job_id.clone());
        }
        s.jobs.insert(job.job_id.clone(), bare);
        s.evict();
        Ok(Write::Done)
    }

    async fn write_result(&self, fence: &Fence, image: &JobImage) -> Result<Recorded, CoordinatorError> {
        let mut s = self.lock();
        let results = s.results.entry(fence.job_id.clone()).or_default();
        Ok(match results.get(&image.task_index) {
            Some(first) => Recorded::Existing(Box::new(first.clone())),
            None => {
                results.insert(image.task_index, image.clone());
                Recorded::New
            }
        })
    }

    async fn active_ids(&self) -> Result<Vec<String>, CoordinatorError> {
        Ok(self
            .lock()
            .jobs
            .values()
            .filter(|j| !is_final(j.status))
            .map(|j| j.job_id.clone())
            .collect())
    }

    async fn forget_active(&self, _job_id: &str) -> Result<(), CoordinatorError> {
        Ok(())
    }

    /// None: the specs are not kept, since the one coordinator of this store never resumes a job.
    async fn load_stored(&self, _job_id: &str) -> Result<Option<StoredJob>, CoordinatorError> {
        Ok(None)
    }

    async fn load_job(&self, job_id: &str, include_images: bool) -> Result<Option<Job>, CoordinatorError> {
        let s = self.lock();
        let Some(mut job) = s.jobs.get(job_id).cloned() else {
            return Ok(None);
        };
        if include_images {
            job.images = s
                .results
                .get(job_id)
                .map(|r| r.values().cloned().collect())
                .unwrap_or_default();
        }
        Ok(Some(job))
    }

    async fn result_indices(&self, job_id: &str) -> Result<Vec<u32>, CoordinatorError> {
        Ok(self
            .lock()
            .results
            .get(job_id)
            .map(|r| r.keys().copied().collect())
            .unwrap_or_default())
    }

    async fn load_results(&self, job_id: &str, indices: &[u32]) -> Result<Vec<JobImage>, CoordinatorError> {
        let s = self.lock();
        let Some(r) = s.results.get(job_id) else {
            return Ok(Vec::new());
        };
        Ok(indices.iter().filter_map(|i| r.get(i).cloned()).collect())
    }

    async fn request_cancel(&self, job_id: &str) -> Result<(), CoordinatorError> {
        self.lock().cancels.insert(job_id.to_owned());
        Ok(())
    }

    async fn cancel_requested(&self, ids: &[String]) -> Result<Vec<bool>, CoordinatorError> {
        let s = self.lock();
        Ok(ids.iter().map(|id| s.cancels.contains(id)).collect())
    }

    async fn list_job_ids(&self, offset: usize, count: usize) -> Result<Vec<String>, CoordinatorError> {
        Ok(self
            .lock()
            .order
            .iter()
            .rev()
            .skip(offset)
            .take(count)
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mip_proto::v1::JobStatus;

    fn job(id: &str, status: JobStatus) -> Job {
        Job {
            job_id: id.to_owned(),
            status: status as i32,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn keeps_results_once_and_lists_newest_first() {
        let s = MemoryStore::default();
        let NewClaim::Claimed(f) = s
            .claim_new("a", Some("k"), "me", Duration::from_secs(1))
            .await
            .expect("memory store")
        else {
            panic!("a new key binds");
        };
        assert_eq!(
            s.claim_new("b", Some("k"), "me", Duration::from_secs(1))
                .await
                .expect("memory store"),
            NewClaim::Existing("a".into())
        );
        s.create(&f, &job("a", JobStatus::Running), &SubmitJobRequest::default(), &[])
            .await
            .expect("memory store");
        s.write_job(&f, &job("b", JobStatus::Done)).await.expect("memory store");
        let img = JobImage {
            task_index: 0,
            seed: 1,
            ..Default::default()
        };
        assert_eq!(s.write_result(&f, &img).await.expect("memory store"), Recorded::New);
        let again = JobImage { seed: 2, ..img.clone() };
        assert_eq!(
            s.write_result(&f, &again).await.expect("memory store"),
            Recorded::Existing(Box::new(img))
        );
        assert_eq!(s.list_job_ids(0, 10).await.expect("memory store"), ["b", "a"]);
        assert_eq!(s.active_ids().await.expect("memory store"), ["a"]);
        let loaded = s.load_job("a", true).await.expect("memory store").expect("stored");
        assert_eq!(loaded.images.len(), 1);
        assert_eq!(loaded.images[0].seed, 1);
    }
}
