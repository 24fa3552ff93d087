//! Job ownership through Redis leases. Each coordinator has a random instance id and holds
//! `mip:coord:lease:{job_id}` = that id (PX `coordinator.lease_ms`) for every job it runs. One background loop per
//! coordinator ([`run`]) renews all of them every third of the lease (a job whose lease turned out to be someone
//! else's, or gone, is abandoned here: its tasks stop, its state is left alone), and every half lease scans
//! `mip:coord:active` for jobs nobody holds, claims them (SET NX PX) and resumes them: tasks with a stored image
//! are DONE, the others run again, and the job span continues the stored trace. Each renewal also applies the
//! cancel requests other replicas recorded for the jobs held here, and a resumed job honours one at once (see
//! [`crate::remote`]).

use std::sync::{Arc, Weak};

use tokio::time::MissedTickBehavior;
use tonic::metadata::{MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::error::CoordinatorError;
use crate::job::{is_final, JobHandle};
use crate::service::{lock, Coordinator, Inner};
use crate::store::{Renewal, TRACE_FIELDS};

/// The W3C fields of `span`'s context (empty when tracing has no OpenTelemetry layer or propagator).
pub fn trace_fields(span: &tracing::Span) -> Vec<(String, String)> {
    let mut md = MetadataMap::new();
    mip_common::propagation::inject(&span.context(), &mut md);
    TRACE_FIELDS
        .iter()
        .filter_map(|f| {
            let v = md.get(*f)?.to_str().ok()?;
            Some(((*f).to_owned(), v.to_owned()))
        })
        .collect()
}

/// Makes `span` continue the trace stored in `fields`.
pub fn continue_trace(span: &tracing::Span, fields: &[(String, String)]) {
    let mut md = MetadataMap::new();
    for (k, v) in fields {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
            MetadataValue::try_from(v.as_str()),
        ) {
            md.insert(key, value);
        }
    }
    mip_common::propagation::set_parent_from(span, &md);
}

/// Renews leases and resumes unowned jobs until the coordinator behind `inner` is dropped.
pub(crate) async fn run(inner: Weak<Inner>) {
    let Some(lease) = inner.upgrade().map(|i| i.cfg.lease) else {
        return;
    };
    let mut renew = tokio::time::interval(lease / 3);
    let mut scan = tokio::time::interval(lease / 2);
    renew.set_missed_tick_behavior(MissedTickBehavior::Delay);
    scan.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let renewing = tokio::select! {
            _ = renew.tick() => true,
            _ = scan.tick() => false,
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let core = Coordinator { inner };
        if renewing {
            core.renew_leases().await;
        } else if let Err(e) = core.resume_unowned().await {
            tracing::warn!(error = %e, "scanning for unowned jobs failed");
        }
    }
}

impl Coordinator {
    /// Renews the leases of this coordinator's running jobs (taking back those that lapsed during a store outage)
    /// and re-writes the state the store missed; abandons the jobs whose lease is someone else's.
    async fn renew_leases(&self) {
        let d = &self.inner.dispatcher;
        let (jobs, ended): (Vec<Arc<JobHandle>>, Vec<Arc<JobHandle>>) = lock(&self.inner.jobs)
            .values()
            .filter(|j| !j.is_abandoned() && (!j.is_finished() || j.is_dirty()))
            .cloned()
            .partition(|j| !j.is_finished());
        // An ended job's final state is the truth: written again whatever became of its lease.
        for job in &ended {
            d.rewrite(job).await;
        }
        if jobs.is_empty() {
            return;
        }
        let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
        let renewals = match d.store.renew_leases(&ids, &d.instance, self.inner.cfg.lease).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, jobs = ids.len(), "renewing job leases failed");
                return;
            }
        };
        let mut kept = Vec::new();
        for (job, renewal) in jobs.iter().zip(renewals) {
            match renewal {
                Renewal::Held | Renewal::Reclaimed => {
                    if renewal == Renewal::Reclaimed {
                        tracing::warn!(parent: &job.span, job_id = %job.id, "job lease lapsed during a store outage; taken back");
                        job.mark_dirty();
                    }
                    d.rewrite(job).await;
                    kept.push(job.clone());
                }
                Renewal::Lost if job.is_finished() => {}
                Renewal::Lost => {
                    tracing::warn!(parent: &job.span, job_id = %job.id, "job lease lost: stopping its tasks here");
                    lock(&self.inner.jobs).remove(&job.id);
                    job.abandon();
                }
            }
        }
        self.apply_cancel_requests(&kept).await;
    }

    /// Claims and resumes every unfinished job that nobody holds a lease on.
    async fn resume_unowned(&self) -> Result<(), CoordinatorError> {
        let ids = self.inner.dispatcher.store.active_ids().await?;
        for id in ids {
            if self.job(&id).is_some() {
                continue;
            }
            if let Err(e) = self.resume(&id).await {
                tracing::warn!(job_id = %id, error = %e, "resuming a job failed");
            }
        }
        Ok(())
    }

    /// Resumes job `id` if its lease can be claimed.
    async fn resume(&self, id: &str) -> Result<(), CoordinatorError> {
        let d = &self.inner.dispatcher;
        if !d.store.claim_lease(id, &d.instance, self.inner.cfg.lease).await? {
            return Ok(());
        }
        let stored = match d.store.load_stored(id).await? {
            Some(s) if !is_final(s.job.status) => s,
            _ => {
                d.store.forget_active(id).await?;
                return d.store.release_lease(id, &d.instance).await;
            }
        };
        let tasks = match self.split(&stored.spec) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(job_id = %id, error = %e, "a stored job no longer validates; dropping it");
                d.store.forget_active(id).await?;
                return d.store.release_lease(id, &d.instance).await;
            }
        };
        let span = tracing::info_span!(parent: None, "job", job_id = %id, resumed = true);
        continue_trace(&span, &stored.trace);
        let deadline_ms = stored.spec.deadline_ms;
        let job = Arc::new(JobHandle::restore(stored.job, stored.images, tasks, deadline_ms, span));
        let pending = job.pending_tasks();
        tracing::info!(parent: &job.span, job_id = %id, pending = pending.len(), "job resumed");
        lock(&self.inner.jobs).insert(id.to_owned(), job.clone());
        lock(&self.inner.order).push(id.to_owned());
        if d.store.cancel_requested(&[id.to_owned()]).await?.first() == Some(&true) {
            tracing::info!(parent: &job.span, job_id = %id, "cancel requested through another replica");
            self.cancel_handle(&job).await;
            return Ok(());
        }
        d.queued.fetch_add(pending.len(), std::sync::atomic::Ordering::SeqCst);
        d.persist(&job).await;
        if pending.is_empty() {
            if let Some(done) = job.finish_if_complete() {
                d.finished(&job, &done).await;
            }
            return Ok(());
        }
        for i in pending {
            tokio::spawn(d.clone().run_task(job.clone(), i));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    fn traceparent(fields: &[(String, String)]) -> String {
        fields
            .iter()
            .find(|(k, _)| k == "traceparent")
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    #[test]
    fn a_resumed_job_span_continues_the_stored_trace() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("coordinator-test")));
        tracing::subscriber::with_default(subscriber, || {
            let first = tracing::info_span!(parent: None, "job");
            let stored = trace_fields(&first);
            let tp = traceparent(&stored);
            assert_eq!(tp.len(), 55, "00-<trace>-<span>-<flags>: {tp:?}");
            let resumed = tracing::info_span!(parent: None, "job", resumed = true);
            continue_trace(&resumed, &stored);
            let again = traceparent(&trace_fields(&resumed));
            assert_eq!(again[3..35], tp[3..35], "same trace");
            assert_ne!(again[36..52], tp[36..52], "a new span");
            let unrelated = traceparent(&trace_fields(&tracing::info_span!(parent: None, "job")));
            assert_ne!(unrelated[3..35], tp[3..35], "a fresh job starts its own trace");
        });
        assert!(
            trace_fields(&tracing::Span::none()).is_empty(),
            "no tracing: nothing stored"
        );
    }
}
