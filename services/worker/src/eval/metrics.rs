//! The published metrics, computed as the paper's evaluation does (cosines in f64 from f32 features):
//!
//! - CLIP-T of an image against its caption: `2.5 * max(cos(image, caption), 0)`;
//! - CLIP-I and DINO of a set of generated images against a subject's reference images: the mean of the full
//!   (generated x reference) matrix of cosines of L2-normalised features;
//! - a multi-subject result averages over its subjects ([`mean`]); a benchmark averages per prompt set, then over
//!   the sets (also [`mean`], applied twice).

/// `cos(a, b)` in f64; 0 when either vector is zero.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    dot / (na.sqrt() * nb.sqrt())
}

/// CLIP-T: `2.5 * max(cos(image, caption), 0)`.
pub fn clip_t(image: &[f32], caption: &[f32]) -> f64 {
    2.5 * cosine(image, caption).max(0.0)
}

/// The (generated x reference) cosine matrix.
pub fn similarity_matrix(generated: &[Vec<f32>], references: &[Vec<f32>]) -> Vec<Vec<f64>> {
    generated
        .iter()
        .map(|g| references.iter().map(|r| cosine(g, r)).collect())
        .collect()
}

/// CLIP-I or DINO of `generated` against `references`: the mean of [`similarity_matrix`]; `None` when either set
/// is empty.
pub fn set_similarity(generated: &[Vec<f32>], references: &[Vec<f32>]) -> Option<f64> {
    mean(similarity_matrix(generated, references).iter().flatten().copied())
}

/// The mean of some scores; `None` when there are none.
pub fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.into_iter().fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosines_scores_and_means() {
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
        assert!((clip_t(&[1.0, 1.0], &[1.0, 1.0]) - 2.5).abs() < 1e-12);
        assert_eq!(clip_t(&[1.0, 0.0], &[-1.0, 0.0]), 0.0);
        let g = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let r = vec![vec![1.0, 0.0], vec![1.0, 1.0], vec![0.0, -2.0]];
        let m = similarity_matrix(&g, &r);
        assert_eq!((m.len(), m[0].len()), (2, 3));
        let want = (1.0 + 0.5f64.sqrt() + 0.0 + 0.0 + 0.5f64.sqrt() - 1.0) / 6.0;
        assert!((set_similarity(&g, &r).expect("mean") - want).abs() < 1e-12);
        assert_eq!(set_similarity(&[], &r), None);
        assert_eq!(mean([1.0, 2.0, 6.0]), Some(3.0));
    }
}
