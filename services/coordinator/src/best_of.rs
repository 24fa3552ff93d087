//! Best-of-N (`SubmitJobRequest.keep_best`): every sample of a request is generated and scored like any other
//! task, and once all samples of a request have ended (done, failed or cancelled) the job shows only the
//! `keep_best` best of its images, ranked by `rank_by` (ties go to the lower sample index). Until then none of
//! that request's images is shown. Every image is still recorded in the store, so a job resumed by another
//! coordinator ranks the same images the same way; which images a job shows is always computed from its task
//! states and its recorded images ([`KeepBest::visible`]), never stored.

use std::collections::BTreeMap;

use mip_proto::v1::{Job, JobImage, RankBy, Scores, SubmitJobRequest, TaskStatus};

/// How many samples of each request a job keeps, and by which score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeepBest {
    pub keep: u32,
    pub samples: u32,
    pub by: RankBy,
}

/// The name of a ranking as the API and the CLI write it.
pub fn rank_name(by: RankBy) -> &'static str {
    match by {
        RankBy::Unspecified | RankBy::ClipI => "clip_i",
        RankBy::Dino => "dino",
        RankBy::ClipT => "clip_t",
        RankBy::Mean => "mean",
    }
}

/// A ranking by its name (`clip_i`, `dino`, `clip_t`, `mean`).
pub fn parse_rank(name: &str) -> Option<RankBy> {
    match name {
        "clip_i" => Some(RankBy::ClipI),
        "dino" => Some(RankBy::Dino),
        "clip_t" => Some(RankBy::ClipT),
        "mean" => Some(RankBy::Mean),
        _ => None,
    }
}

impl KeepBest {
    /// The job's best-of-N settings; `None` when it keeps every sample. `rank_by` must have been validated.
    pub fn of(spec: &SubmitJobRequest) -> Option<Self> {
        (spec.keep_best > 0).then(|| Self {
            keep: spec.keep_best,
            samples: spec.samples.max(1),
            by: RankBy::try_from(spec.rank_by).unwrap_or(RankBy::ClipI),
        })
    }

    /// The score an image is ranked by; an image without it ranks last.
    pub fn value(&self, scores: Option<&Scores>) -> f64 {
        let Some(s) = scores else {
            return f64::NEG_INFINITY;
        };
        let v = match self.by {
            RankBy::Unspecified | RankBy::ClipI => s.clip_i,
            RankBy::Dino => s.dino,
            RankBy::ClipT => Some(s.clip_t),
            RankBy::Mean => {
                let present: Vec<f64> = [Some(s.clip_t), s.clip_i, s.dino].into_iter().flatten().collect();
                Some(present.iter().sum::<f64>() / present.len() as f64)
            }
        };
        v.filter(|x| x.is_finite()).unwrap_or(f64::NEG_INFINITY)
    }

    /// The request a task belongs to (tasks are split request by request, `samples` each).
    pub fn request_of(&self, task_index: u32) -> u32 {
        task_index / self.samples
    }

    /// Whether every sample of `request` has ended.
    pub fn request_ended(&self, job: &Job, request: u32) -> bool {
        let ended = |s: i32| {
            s == TaskStatus::Done as i32 || s == TaskStatus::Failed as i32 || s == TaskStatus::Cancelled as i32
        };
        job.tasks
            .iter()
            .filter(|t| self.request_of(t.task_index) == request)
            .all(|t| ended(t.status))
    }

    /// The requests whose samples have all ended.
    pub fn ended_requests(&self, job: &Job) -> std::collections::BTreeSet<u32> {
        (0..job.total_tasks)
            .map(|t| self.request_of(t))
            .filter(|r| self.request_ended(job, *r))
            .collect()
    }

    /// The kept images of one request's `images`, best first, with their `rank` (1 = best).
    pub fn best(&self, mut images: Vec<JobImage>) -> Vec<JobImage> {
        images.sort_by(|a, b| {
            self.value(b.scores.as_ref())
                .total_cmp(&self.value(a.scores.as_ref()))
                .then(a.sample_index.cmp(&b.sample_index))
        });
        images.truncate(self.keep as usize);
        for (i, img) in images.iter_mut().enumerate() {
            img.rank = i as u32 + 1;
        }
        images
    }

    /// The images the job shows: the kept ones of every request whose samples all ended, in task order.
    pub fn visible(&self, job: &Job, images: impl IntoIterator<Item = JobImage>) -> Vec<JobImage> {
        let mut by_request: BTreeMap<u32, Vec<JobImage>> = BTreeMap::new();
        for img in images {
            by_request.entry(self.request_of(img.task_index)).or_default().push(img);
        }
        let mut out: Vec<JobImage> = by_request
            .into_iter()
            .filter(|(r, _)| self.request_ended(job, *r))
            .flat_map(|(_, imgs)| self.best(imgs))
            .collect();
        out.sort_by_key(|i| i.task_index);
        out
    }
}

/// The images a job with spec `spec` shows, of its recorded `images`.
pub fn visible(spec: &SubmitJobRequest, job: &Job, images: Vec<JobImage>) -> Vec<JobImage> {
    match KeepBest::of(spec) {
        None => images,
        Some(k) => k.visible(job, images),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mip_proto::v1::TaskState;

    fn image(task: u32, clip_i: f64, clip_t: f64) -> JobImage {
        JobImage {
            task_index: task,
            request_index: task / 3,
            sample_index: task % 3,
            scores: Some(Scores {
                clip_t,
                clip_i: Some(clip_i),
                dino: Some(0.0),
                subjects: vec![],
            }),
            ..Default::default()
        }
    }

    fn job(statuses: &[TaskStatus]) -> Job {
        Job {
            tasks: statuses
                .iter()
                .enumerate()
                .map(|(i, s)| TaskState {
                    task_index: i as u32,
                    status: *s as i32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_best_of_each_ended_request_is_shown_ranked() {
        let spec = SubmitJobRequest {
            samples: 3,
            keep_best: 1,
            rank_by: RankBy::ClipI as i32,
            ..Default::default()
        };
        use TaskStatus::{Done, Failed, Running};
        let images = vec![
            image(0, 0.2, 0.9),
            image(1, 0.7, 0.1),
            image(2, 0.5, 0.5),
            image(3, 0.9, 0.0),
        ];
        // Request 0 ended (its three samples done); request 1 still runs one sample.
        let shown = visible(&spec, &job(&[Done, Done, Done, Done, Running, Done]), images.clone());
        assert_eq!(
            shown.iter().map(|i| (i.task_index, i.rank)).collect::<Vec<_>>(),
            vec![(1, 1)]
        );
        let shown = visible(&spec, &job(&[Done, Done, Done, Done, Failed, Done]), images.clone());
        assert_eq!(shown.iter().map(|i| i.task_index).collect::<Vec<_>>(), vec![1, 3]);
        let by_t = SubmitJobRequest {
            keep_best: 2,
            rank_by: RankBy::ClipT as i32,
            ..spec.clone()
        };
        let shown = KeepBest::of(&by_t).expect("keep").best(images[..3].to_vec());
        assert_eq!(
            shown.iter().map(|i| (i.task_index, i.rank)).collect::<Vec<_>>(),
            vec![(0, 1), (2, 2)]
        );
        let plain = SubmitJobRequest { keep_best: 0, ..spec };
        assert_eq!(visible(&plain, &job(&[Running; 6]), images.clone()).len(), 4);
    }

    #[test]
    fn ties_go_to_the_lower_sample_and_unscored_images_rank_last() {
        let k = KeepBest {
            keep: 3,
            samples: 3,
            by: RankBy::Mean,
        };
        let mut unscored = image(0, 0.0, 0.0);
        unscored.scores = None;
        let shown = k.best(vec![unscored, image(2, 0.5, 0.5), image(1, 0.5, 0.5)]);
        assert_eq!(shown.iter().map(|i| i.task_index).collect::<Vec<_>>(), vec![1, 2, 0]);
        assert!((k.value(image(0, 0.3, 0.6).scores.as_ref()) - 0.3).abs() < 1e-12);
    }
}
