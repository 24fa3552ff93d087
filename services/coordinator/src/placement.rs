//! Where a task goes: rendezvous (highest-random-weight) hashing of the task's affinity key over the worker URLs,
//! filtered by the bounded-load rule — a worker is skipped while its load is above `LOAD_FACTOR × average + 1` —
//! then the skipped workers least loaded first.

use mip_proto::v1::GenerationRequest;

/// `c` of the bounded-load rule.
pub const LOAD_FACTOR: f64 = 1.25;

/// The affinity key of a request: blake3 over its subjects' content (image bytes, or cache keys), in order; a
/// request without subjects keys on `fallback` (so such tasks spread).
pub fn affinity_key(req: &GenerationRequest, fallback: &str) -> [u8; 32] {
    if req.subjects.is_empty() {
        return *blake3::hash(fallback.as_bytes()).as_bytes();
    }
    let mut h = blake3::Hasher::new();
    for s in &req.subjects {
        h.update(&(s.images.len() as u64).to_le_bytes());
        for img in &s.images {
            h.update(blake3::hash(img).as_bytes());
        }
        h.update(&(s.subject_key.len() as u64).to_le_bytes());
        h.update(s.subject_key.as_bytes());
    }
    *h.finalize().as_bytes()
}

/// The rendezvous weight of `url` for `key`.
fn weight(key: &[u8; 32], url: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(key);
    h.update(url.as_bytes());
    let b = h.finalize();
    let mut w = [0u8; 8];
    w.copy_from_slice(&b.as_bytes()[..8]);
    u64::from_le_bytes(w)
}

/// A worker as placement sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub url: &'a str,
    pub load: u32,
    /// Healthy and not excluded for this task.
    pub usable: bool,
}

/// Indices of the usable workers in the order to try: rendezvous order among those within the load bound, then
/// the rest by load (ties by rendezvous order).
pub fn order(key: &[u8; 32], workers: &[Candidate<'_>]) -> Vec<usize> {
    let usable: Vec<usize> = (0..workers.len()).filter(|&i| workers[i].usable).collect();
    if usable.is_empty() {
        return usable;
    }
    let total: u64 = usable.iter().map(|&i| u64::from(workers[i].load)).sum();
    let avg = total as f64 / usable.len() as f64;
    let bound = LOAD_FACTOR * avg + 1.0;
    let mut ranked = usable;
    ranked.sort_by_key(|&i| std::cmp::Reverse(weight(key, workers[i].url)));
    let (mut within, mut over): (Vec<usize>, Vec<usize>) =
        ranked.into_iter().partition(|&i| f64::from(workers[i].load) <= bound);
    over.sort_by_key(|&i| workers[i].load);
    within.extend(over);
    within
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands<'a>(urls: &'a [String], loads: &[u32]) -> Vec<Candidate<'a>> {
        urls.iter()
            .zip(loads)
            .map(|(u, &l)| Candidate {
                url: u,
                load: l,
                usable: true,
            })
            .collect()
    }

    #[test]
    fn same_key_same_worker_and_keys_spread() {
        let urls: Vec<String> = (0..3).map(|i| format!("http://w{i}:1")).collect();
        let c = cands(&urls, &[0, 0, 0]);
        let k = [7u8; 32];
        assert_eq!(order(&k, &c)[0], order(&k, &c)[0]);
        let firsts: std::collections::HashSet<usize> = (0..30u8).map(|i| order(&[i; 32], &c)[0]).collect();
        assert!(firsts.len() > 1);
    }

    #[test]
    fn overloaded_preferred_worker_is_skipped() {
        let urls: Vec<String> = (0..3).map(|i| format!("http://w{i}:1")).collect();
        let k = [3u8; 32];
        let first = order(&k, &cands(&urls, &[0, 0, 0]))[0];
        let mut loads = [0u32; 3];
        loads[first] = 5; // avg 5/3, bound 3.08
        let o = order(&k, &cands(&urls, &loads));
        assert_ne!(o[0], first);
        assert_eq!(*o.last().expect("all"), first);
    }

    #[test]
    fn unusable_workers_are_left_out_and_key_follows_content() {
        let urls: Vec<String> = (0..2).map(|i| format!("http://w{i}:1")).collect();
        let mut c = cands(&urls, &[0, 0]);
        c[0].usable = false;
        assert_eq!(order(&[1; 32], &c), vec![1]);
        let mut r = GenerationRequest::default();
        assert_ne!(affinity_key(&r, "a"), affinity_key(&r, "b"));
        r.subjects.push(mip_proto::v1::Subject {
            name: "cat".into(),
            images: vec![vec![1, 2, 3]],
            subject_key: String::new(),
        });
        assert_eq!(affinity_key(&r, "a"), affinity_key(&r, "b"));
    }
}
