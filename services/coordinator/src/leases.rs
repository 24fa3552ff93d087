//! Job ownership through leases in the store. Each coordinator has a random instance id and holds the lease of
//! every job it runs, claimed with a fencing token (see [`crate::store`]). [`Leases::run`], started by the server
//! with its shutdown signal, renews them every third of the lease and scans for unowned jobs every half lease:
//!
//! - a lease that turned out to be someone else's (or the job ended elsewhere) is [`LeaseHolder::lost`]: the
//!   job's tasks stop here, its state is left alone;
//! - a lease that lapsed during a store outage and that nobody claimed since is taken back, and the job is marked
//!   dirty so that its state is written in full;
//! - an unfinished job in the store's active set that nobody holds is claimed with a new token and
//!   [resumed](LeaseHolder::resume).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use crate::error::CoordinatorError;
use crate::job::JobHandle;
use crate::store::{Fence, JobStore, NewClaim, Renewal};

/// What the lease loop works for: the coordinator running the jobs.
#[tonic::async_trait]
pub trait LeaseHolder: Send + Sync {
    /// The jobs whose leases are to be kept (unfinished ones run here, and ended ones not yet written).
    fn held(&self) -> Vec<Arc<JobHandle>>;
    /// After a renewal, with the jobs still held (write what the store missed, apply recorded cancel requests).
    async fn renewed(&self, kept: Vec<Arc<JobHandle>>);
    /// `job`'s lease belongs to another coordinator now.
    fn lost(&self, job: &Arc<JobHandle>);
    /// Whether job `id` runs here.
    fn runs(&self, id: &str) -> bool;
    /// Resumes a job whose lease was just claimed with `fence`.
    async fn resume(&self, fence: Fence) -> Result<(), CoordinatorError>;
}

/// This coordinator's leases.
pub struct Leases {
    instance: String,
    store: Arc<dyn JobStore>,
    lease: Duration,
}

impl Leases {
    /// Leases of `lease` each, under a fresh random instance id.
    pub fn new(store: Arc<dyn JobStore>, lease: Duration) -> Self {
        Self {
            instance: format!("{:032x}", rand::random::<u128>()),
            store,
            lease,
        }
    }

    /// The instance id (the value of every lease held here).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Claims a new job (binding its idempotency key, when it has one).
    pub async fn claim_new(&self, job_id: &str, idempotency_key: &str) -> Result<NewClaim, CoordinatorError> {
        let key = (!idempotency_key.is_empty()).then_some(idempotency_key);
        self.store.claim_new(job_id, key, &self.instance, self.lease).await
    }

    /// Renews leases and resumes unowned jobs for `holder` until `shutdown` resolves.
    pub async fn run(&self, holder: &dyn LeaseHolder, shutdown: impl Future<Output = ()>) {
        let mut renew = tokio::time::interval(self.lease / 3);
        let mut scan = tokio::time::interval(self.lease / 2);
        renew.set_missed_tick_behavior(MissedTickBehavior::Delay);
        scan.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = renew.tick() => self.renew(holder).await,
                _ = scan.tick() => if let Err(e) = self.scan(holder).await {
                    tracing::warn!(error = %e, "scanning for unowned jobs failed");
                },
            }
        }
    }

    /// One renewal of every held lease.
    pub async fn renew(&self, holder: &dyn LeaseHolder) {
        let jobs = holder.held();
        let fences: Vec<Fence> = jobs.iter().map(|j| j.record.fence.clone()).collect();
        let renewals = match self.store.renew(&fences, self.lease).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, jobs = jobs.len(), "renewing job leases failed");
                return;
            }
        };
        let mut kept = Vec::new();
        for (job, renewal) in jobs.into_iter().zip(renewals) {
            match renewal {
                Renewal::Held => kept.push(job),
                Renewal::Reclaimed => {
                    tracing::warn!(parent: &job.span.get(), job_id = %job.id, "job lease lapsed during a store outage; taken back");
                    job.mark_dirty();
                    kept.push(job);
                }
                Renewal::Lost => {
                    tracing::warn!(parent: &job.span.get(), job_id = %job.id, "job lease lost: stopping its tasks here");
                    holder.lost(&job);
                }
            }
        }
        holder.renewed(kept).await;
    }

    /// Claims and resumes every unfinished job that nobody holds.
    async fn scan(&self, holder: &dyn LeaseHolder) -> Result<(), CoordinatorError> {
        for id in self.store.active_ids().await? {
            if holder.runs(&id) {
                continue;
            }
            let fence = match self.store.claim(&id, &self.instance, self.lease).await {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(job_id = %id, error = %e, "claiming an unowned job failed");
                    continue;
                }
            };
            if let Err(e) = holder.resume(fence).await {
                tracing::warn!(job_id = %id, error = %e, "resuming a job failed");
            }
        }
        Ok(())
    }
}
