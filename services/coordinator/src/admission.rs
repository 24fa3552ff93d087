//! Admission at the door: before a job is stored or queued, each of its requests is checked with the cluster's
//! shared rules (`mip-admission`, the very code the worker runs) against the coordinator's own `limits`, images
//! decoded in full (truncated, corrupt or oversized data is refused here, not on a worker), and then against the
//! limits the workers report in `Info`: a request that no known worker can run is refused too. Errors name the
//! request index and the field (`requests[1].subjects[0].images[2]`), the rule and the value.

use mip_admission::{validate_generation, Defaults, ImageCheck, InvalidInput, Limits};
use mip_proto::v1::{GenerationRequest, RankBy, SubmitJobRequest, WorkerStatus};

use crate::config::ValidConfig;
use crate::error::CoordinatorError;
use crate::job::TaskSpec;

/// What zero sizes and an absent scale become when no worker has reported its model's defaults yet.
const FALLBACK_DEFAULTS: Defaults = Defaults {
    size: [1024, 1024],
    scale: 0.75,
};

/// The limits and defaults one worker reported, and whether it can score.
#[derive(Debug, Clone, Copy, PartialEq)]
struct WorkerRules {
    limits: Limits,
    defaults: Defaults,
    scoring: bool,
}

/// The distinct rules of the workers (a fleet of identical workers is checked against once).
fn worker_rules(workers: &[WorkerStatus]) -> Vec<WorkerRules> {
    let mut rules: Vec<WorkerRules> = Vec::new();
    let reported = workers.iter().filter_map(|w| {
        let info = w.info.as_ref()?;
        let limits = Limits::from_proto(info.limits.as_ref()?)?;
        let size = [info.default_width as usize, info.default_height as usize];
        let defaults = if size.contains(&0) || !info.default_scale.is_finite() {
            FALLBACK_DEFAULTS
        } else {
            Defaults {
                size,
                scale: info.default_scale,
            }
        };
        Some(WorkerRules {
            limits,
            defaults,
            scoring: info.scoring,
        })
    });
    for r in reported {
        if !rules.contains(&r) {
            rules.push(r);
        }
    }
    rules
}

/// Checks every request of a job (on a blocking thread: images are decoded); `workers` is the registry's view.
/// A scored request (`score`, or every request of a job with `keep_best`) is checked against the workers that can
/// score; when every worker has reported a loaded model and none can score, the job is refused with
/// FAILED_PRECONDITION.
pub async fn check_requests(
    req: &SubmitJobRequest,
    limits: Limits,
    workers: Vec<WorkerStatus>,
) -> Result<(), CoordinatorError> {
    let all = worker_rules(&workers);
    let scorers: Vec<WorkerRules> = all.iter().copied().filter(|w| w.scoring).collect();
    // A worker that has not reported a loaded model (still loading, or never reached) may yet score.
    let all_loaded = workers
        .iter()
        .all(|w| w.info.as_ref().is_some_and(|i| !i.model.is_empty()));
    let best_of = req.keep_best > 0;
    if let Some(i) = req.requests.iter().position(|r| r.score || best_of) {
        if !workers.is_empty() && all_loaded && scorers.is_empty() {
            let field = if best_of {
                "keep_best".to_owned()
            } else {
                format!("requests[{i}].score")
            };
            return Err(CoordinatorError::ScoringUnavailable(format!(
                "`{field}` needs a worker that can score, and none of the {} workers has evaluation models \
                 (`eval` in its bundle's mip.json: a CLIP ViT-B/32 and a DINO ViT-S/16 folder)",
                workers.len()
            )));
        }
    }
    let requests = req.requests.clone();
    tokio::task::spawn_blocking(move || {
        requests.into_iter().enumerate().try_for_each(|(i, r)| {
            let rules = if r.score || best_of { &scorers } else { &all };
            check_request(r, &limits, rules).map_err(|e| e.within(&format!("requests[{i}].")))
        })
    })
    .await
    .map_err(|e| CoordinatorError::Store(format!("admission task: {e}")))?
    .map_err(CoordinatorError::from)
}

/// One request: the coordinator's limits with a full image decode, then at least one worker's limits.
fn check_request(r: GenerationRequest, limits: &Limits, workers: &[WorkerRules]) -> Result<(), InvalidInput> {
    let defaults = workers.first().map_or(FALLBACK_DEFAULTS, |w| w.defaults);
    validate_generation(r.clone(), limits, &defaults, ImageCheck::Decode)?;
    // A worker with the coordinator's own rules admits what was just admitted: no second pass over the images.
    if workers.iter().any(|w| w.limits == *limits && w.defaults == defaults) {
        return Ok(());
    }
    let mut first_refusal = None;
    for w in workers {
        match validate_generation(r.clone(), &w.limits, &w.defaults, ImageCheck::Header) {
            Ok(_) => return Ok(()),
            Err(e) => {
                first_refusal.get_or_insert(e);
            }
        }
    }
    match first_refusal {
        None => Ok(()),
        Some(mut e) => {
            e.rule = format!("{} (the limit of every worker)", e.rule);
            Err(e)
        }
    }
}

/// One task per image: request × sample; seed = request seed + sample index when a seed is given.
pub fn split(req: &SubmitJobRequest, cfg: &ValidConfig) -> Result<Vec<TaskSpec>, CoordinatorError> {
    if req.requests.is_empty() || req.requests.len() > cfg.max_requests {
        return Err(CoordinatorError::invalid(
            "requests",
            format!("must hold 1..={} requests", cfg.max_requests),
            req.requests.len(),
        ));
    }
    let samples = req.samples.max(1);
    if samples > cfg.max_samples {
        return Err(CoordinatorError::invalid(
            "samples",
            format!("must be in 0..={}", cfg.max_samples),
            samples,
        ));
    }
    check_best_of(req, samples)?;
    if req.idempotency_key.len() > 256 {
        return Err(CoordinatorError::invalid(
            "idempotency_key",
            "must be at most 256 bytes",
            req.idempotency_key.len(),
        ));
    }
    let mut tasks = Vec::new();
    for (ri, r) in req.requests.iter().enumerate() {
        for s in 0..samples {
            tasks.push(TaskSpec {
                index: tasks.len() as u32,
                request_index: ri as u32,
                sample_index: s,
                seed: r.seed.map(|seed| seed.wrapping_add(u64::from(s))),
            });
        }
    }
    Ok(tasks)
}

/// `keep_best` within the samples; `rank_by` a known ranking, and only with `keep_best`.
fn check_best_of(req: &SubmitJobRequest, samples: u32) -> Result<(), CoordinatorError> {
    if req.keep_best > samples {
        return Err(CoordinatorError::invalid(
            "keep_best",
            format!("must be in 0..=samples ({samples})"),
            req.keep_best,
        ));
    }
    let Ok(by) = RankBy::try_from(req.rank_by) else {
        return Err(CoordinatorError::invalid(
            "rank_by",
            "must be RANK_BY_CLIP_I, RANK_BY_DINO, RANK_BY_CLIP_T or RANK_BY_MEAN",
            req.rank_by,
        ));
    };
    if req.keep_best == 0 && by != RankBy::Unspecified {
        return Err(CoordinatorError::invalid(
            "rank_by",
            "applies only with keep_best > 0",
            crate::best_of::rank_name(by),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mip_proto::v1::{Subject, WorkerInfo};

    fn png() -> Vec<u8> {
        let mut out = Vec::new();
        let img = image::RgbImage::from_pixel(3, 3, image::Rgb([9, 9, 9]));
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .expect("png");
        out
    }

    fn request(steps: u32) -> GenerationRequest {
        GenerationRequest {
            prompt: "a cat".into(),
            subjects: vec![Subject {
                name: "cat".into(),
                images: vec![png()],
                subject_key: String::new(),
            }],
            steps,
            ..Default::default()
        }
    }

    fn worker(max_steps: usize) -> WorkerStatus {
        let limits = Limits {
            max_steps,
            ..Limits::default()
        };
        WorkerStatus {
            info: Some(WorkerInfo {
                model: "fixture".into(),
                limits: Some(limits.to_proto()),
                default_width: 64,
                default_height: 64,
                default_scale: 0.75,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn requests_are_named_by_index_and_checked_against_the_workers() {
        let l = Limits::default();
        check_requests(&job(vec![request(4)]), l, vec![]).await.expect("valid");
        let e = check_requests(&job(vec![request(4), request(101)]), l, vec![])
            .await
            .expect_err("101 steps");
        assert!(e.to_string().contains("`requests[1].steps`"), "{e}");
        // 50 steps is within the coordinator's limits but beyond both workers'.
        let ws = vec![worker(20), worker(40)];
        let e = check_requests(&job(vec![request(50)]), l, ws.clone())
            .await
            .expect_err("no worker");
        assert!(e.to_string().contains("every worker"), "{e}");
        check_requests(&job(vec![request(30)]), l, ws)
            .await
            .expect("the second worker can");
        let mut truncated = request(4);
        let png = png();
        truncated.subjects[0].images[0] = png[..png.len() - 8].to_vec();
        let e = check_requests(&job(vec![truncated]), l, vec![])
            .await
            .expect_err("truncated");
        assert!(e.to_string().contains("requests[0].subjects[0].images[0]"), "{e}");
    }

    #[tokio::test]
    async fn scoring_needs_a_worker_that_can_score() {
        let l = Limits::default();
        let scored = GenerationRequest {
            score: true,
            ..request(4)
        };
        // No worker reported yet: the job waits for one.
        check_requests(&job(vec![scored.clone()]), l, vec![])
            .await
            .expect("no workers known");
        // A worker still loading may yet score.
        let mut loading = worker(20);
        loading.info.as_mut().expect("info").model.clear();
        check_requests(&job(vec![scored.clone()]), l, vec![loading])
            .await
            .expect("not known yet");
        let plain = vec![worker(20)];
        let e = check_requests(&job(vec![request(4), scored.clone()]), l, plain.clone())
            .await
            .expect_err("nobody scores");
        assert!(matches!(e, CoordinatorError::ScoringUnavailable(_)), "{e}");
        assert!(e.to_string().contains("`requests[1].score`"), "{e}");
        let best_of = SubmitJobRequest {
            keep_best: 1,
            samples: 2,
            ..job(vec![request(4)])
        };
        let e = check_requests(&best_of, l, plain.clone())
            .await
            .expect_err("nobody scores");
        assert!(e.to_string().contains("`keep_best`"), "{e}");
        let mut scorer = worker(10);
        scorer.info.as_mut().expect("info").scoring = true;
        let ws = vec![worker(20), scorer];
        check_requests(&best_of, l, ws.clone())
            .await
            .expect("one worker scores");
        // The scoring worker's own limits apply to scored requests: 15 steps suit the other worker only.
        check_requests(&job(vec![request(15)]), l, ws.clone())
            .await
            .expect("unscored");
        let scored = GenerationRequest {
            score: true,
            ..request(15)
        };
        let e = check_requests(&job(vec![scored]), l, ws)
            .await
            .expect_err("10 steps at most");
        assert!(e.to_string().contains("every worker"), "{e}");
    }

    #[test]
    fn keep_best_and_rank_by_are_checked() {
        let mut cfg = crate::config::CoordinatorConfig::default();
        cfg.coordinator.workers = vec!["http://127.0.0.1:1".into()];
        let cfg = cfg.validate().expect("config");
        let with = |samples, keep_best, rank_by: RankBy| SubmitJobRequest {
            samples,
            keep_best,
            rank_by: rank_by as i32,
            ..job(vec![request(4)])
        };
        assert_eq!(split(&with(4, 1, RankBy::Dino), &cfg).expect("valid").len(), 4);
        let e = split(&with(2, 3, RankBy::ClipI), &cfg).expect_err("3 of 2");
        assert_eq!(e.to_string(), "`keep_best` must be in 0..=samples (2), got 3");
        let e = split(&with(2, 0, RankBy::Mean), &cfg).expect_err("no keep_best");
        assert_eq!(e.to_string(), "`rank_by` applies only with keep_best > 0, got mean");
        let e = split(
            &SubmitJobRequest {
                rank_by: 9,
                ..with(2, 1, RankBy::ClipI)
            },
            &cfg,
        )
        .expect_err("unknown");
        assert!(e.to_string().starts_with("`rank_by` must be RANK_BY_CLIP_I"), "{e}");
    }

    fn job(requests: Vec<GenerationRequest>) -> SubmitJobRequest {
        SubmitJobRequest {
            requests,
            ..Default::default()
        }
    }
}
