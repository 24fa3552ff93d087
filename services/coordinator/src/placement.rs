//! Where a task goes: among the workers within the bounded-load rule (load at most `LOAD_FACTOR × average + 1`),
//! first those that served the task's subjects recently ("warm", as the registry remembers it), then rendezvous
//! (highest-random-weight) order of the task's affinity key over the worker URLs; then the workers over the bound,
//! least loaded first. [`classify`] names the outcome for `mip_coord_affinity_total`.
//!
//! Tasks without subjects get a key whose first 16 bytes are zero ([`has_subjects`] is false): they spread by
//! rendezvous order, and the registry neither remembers nor counts them.

use std::sync::Arc;

use mip_proto::v1::GenerationRequest;

use crate::metrics::Affinity;

/// A worker's identity for the life of the coordinator (its slot in the registry); never reused, even when its
/// URL comes back.
pub type WorkerId = usize;

/// `c` of the bounded-load rule.
pub const LOAD_FACTOR: f64 = 1.25;

/// The affinity key of a request: blake3 over its subjects' content (image bytes, or cache keys), in order; a
/// request without subjects keys on `fallback` (so such tasks spread), marked by 16 leading zero bytes.
pub fn affinity_key(req: &GenerationRequest, fallback: &str) -> [u8; 32] {
    if req.subjects.is_empty() {
        let mut key = [0u8; 32];
        key[16..].copy_from_slice(&blake3::hash(fallback.as_bytes()).as_bytes()[..16]);
        return key;
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

/// Whether `key` comes from subjects (not from a subject-less request's fallback).
pub fn has_subjects(key: &[u8; 32]) -> bool {
    key[..16].iter().any(|&b| b != 0)
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
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: WorkerId,
    pub url: Arc<str>,
    pub load: u32,
    /// Healthy and not excluded for this task.
    pub usable: bool,
    /// It served this task's subjects recently.
    pub warm: bool,
}

/// Indices of the usable workers in the order to try: among those within the load bound the warm ones first, each
/// group in rendezvous order; then the rest by load (ties by rendezvous order).
pub fn order(key: &[u8; 32], workers: &[Candidate]) -> Vec<usize> {
    let usable: Vec<usize> = (0..workers.len()).filter(|&i| workers[i].usable).collect();
    if usable.is_empty() {
        return usable;
    }
    let total: u64 = usable.iter().map(|&i| u64::from(workers[i].load)).sum();
    let avg = total as f64 / usable.len() as f64;
    let bound = LOAD_FACTOR * avg + 1.0;
    let mut ranked = usable;
    ranked.sort_by_key(|&i| std::cmp::Reverse(weight(key, &workers[i].url)));
    let (mut within, mut over): (Vec<usize>, Vec<usize>) =
        ranked.into_iter().partition(|&i| f64::from(workers[i].load) <= bound);
    // Stable: rendezvous order stays within the warm and the cold group.
    within.sort_by_key(|&i| !workers[i].warm);
    over.sort_by_key(|&i| workers[i].load);
    within.extend(over);
    within
}

/// The usable worker ranked first by rendezvous weight alone (load and warmth aside).
pub fn rendezvous_first(key: &[u8; 32], workers: &[Candidate]) -> Option<usize> {
    (0..workers.len())
        .filter(|&i| workers[i].usable)
        .max_by_key(|&i| weight(key, &workers[i].url))
}

/// The affinity outcome of placing a task with `key` on `workers[chosen]`: hot when that worker held the key warm,
/// cold when it is the rendezvous-first worker without it, spilled otherwise.
pub fn classify(key: &[u8; 32], workers: &[Candidate], chosen: usize) -> Affinity {
    if workers.get(chosen).is_some_and(|c| c.warm) {
        Affinity::Hot
    } else if rendezvous_first(key, workers) == Some(chosen) {
        Affinity::Cold
    } else {
        Affinity::Spilled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(urls: &[String], loads: &[u32]) -> Vec<Candidate> {
        urls.iter()
            .zip(loads)
            .enumerate()
            .map(|(id, (u, &l))| Candidate {
                id,
                url: u.as_str().into(),
                load: l,
                usable: true,
                warm: false,
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
        assert!(has_subjects(&affinity_key(&r, "a")));
        r.subjects.clear();
        assert!(!has_subjects(&affinity_key(&r, "a")));
    }

    #[test]
    fn warm_worker_first_within_the_bound_and_outcomes() {
        let urls: Vec<String> = (0..3).map(|i| format!("http://w{i}:1")).collect();
        let k = [9u8; 32];
        let mut c = cands(&urls, &[0, 0, 0]);
        let first = order(&k, &c)[0];
        assert_eq!(rendezvous_first(&k, &c), Some(first));
        assert_eq!(classify(&k, &c, first), Affinity::Cold);
        let other = (first + 1) % 3;
        assert_eq!(classify(&k, &c, other), Affinity::Spilled);
        c[other].warm = true;
        assert_eq!(order(&k, &c)[0], other, "warm beats rendezvous order");
        assert_eq!(classify(&k, &c, other), Affinity::Hot);
        // A warm worker over the load bound is not preferred.
        c[other].load = 9;
        assert_eq!(order(&k, &c)[0], first);
        assert_eq!(*order(&k, &c).last().expect("all"), other);
    }
}
