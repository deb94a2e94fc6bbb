//! Quality of a variant's outputs: classification figures against labels (top-1, top-k, macro
//! precision/recall/F1, per class), regression errors (MAE, RMSE), and fidelity to the base variant's
//! outputs on the same inputs and to reference outputs shipped with an eval set (cosine similarity,
//! max abs error, top-1 agreement). Computed by the agent
//! on its platform, stored with each run as JSON.

use serde::{Deserialize, Serialize};

/// Everything measured about a run's outputs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    /// Against labels, for classifiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classification: Option<Classification>,
    /// Against targets, for regressors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regression: Option<Regression>,
    /// Against the base variant's outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fidelity: Option<Fidelity>,
    /// Against reference outputs shipped with the eval set (an ONNX test_data_set's output_0.pb).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Fidelity>,
    /// Decoders: next-token prediction over a token eval set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<LanguageModeling>,
}

/// Next-token prediction over token sequences (teacher forcing): perplexity and top-1 accuracy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LanguageModeling {
    /// Sequences read.
    pub sequences: u64,
    /// Tokens predicted (each sequence's length less one).
    pub tokens: u64,
    /// exp(mean negative log-likelihood of the true next token).
    pub perplexity: f64,
    /// Share of positions whose most likely next token is the true one.
    pub next_token_accuracy: f64,
}

/// Sums for [`LanguageModeling`] over sequences: negative log-likelihood, hits, count.
#[derive(Debug, Clone, Copy, Default)]
pub struct NextTokenSums {
    nll: f64,
    hits: u64,
    tokens: u64,
    sequences: u64,
}

impl NextTokenSums {
    /// Adds one sequence: `logits` row t (`vocab` wide) predicts `targets[t]`. Negative targets (the
    /// ignore index, -100, that pads Hugging Face label arrays) are skipped; a target outside the
    /// vocabulary is an error naming it.
    pub fn add(&mut self, logits: &[f32], vocab: usize, targets: &[i64]) -> Result<(), String> {
        if let Some(bad) = targets.iter().find(|&&t| t >= vocab as i64) {
            return Err(format!(
                "label {bad} is outside the model's vocabulary of {vocab}"
            ));
        }
        for (row, &target) in logits.chunks(vocab.max(1)).zip(targets) {
            if target < 0 {
                continue;
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            let t = target as usize;
            self.nll += max + sum.ln() - row[t] as f64;
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                )
                .0;
            self.hits += u64::from(best == t);
            self.tokens += 1;
        }
        self.sequences += 1;
        Ok(())
    }

    /// The figures, or None when nothing was predicted.
    pub fn finish(&self) -> Option<LanguageModeling> {
        (self.tokens > 0).then(|| LanguageModeling {
            sequences: self.sequences,
            tokens: self.tokens,
            perplexity: (self.nll / self.tokens as f64).exp(),
            next_token_accuracy: self.hits as f64 / self.tokens as f64,
        })
    }
}

/// Classification figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Classification {
    /// Rows evaluated.
    pub samples: u64,
    /// Top-1 accuracy in [0, 1].
    pub top1: f64,
    /// Top-k accuracy in [0, 1] (absent when the model outputs labels, not scores).
    pub topk: Option<f64>,
    /// k of top-k.
    pub k: u32,
    /// Unweighted mean over classes.
    pub macro_precision: f64,
    /// Unweighted mean over classes.
    pub macro_recall: f64,
    /// Unweighted mean over classes.
    pub macro_f1: f64,
    /// Per class.
    pub per_class: Vec<ClassFigures>,
}

/// One class's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassFigures {
    /// Class index.
    pub class: i64,
    /// TP / (TP + FP); 0 when never predicted.
    pub precision: f64,
    /// TP / (TP + FN); 0 when absent.
    pub recall: f64,
    /// Harmonic mean of the two.
    pub f1: f64,
    /// Rows of this class.
    pub support: u64,
}

/// Regression errors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Regression {
    /// Rows evaluated.
    pub samples: u64,
    /// Mean absolute error.
    pub mae: f64,
    /// Root mean squared error.
    pub rmse: f64,
}

/// Agreement with the base variant's outputs on the same inputs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Fidelity {
    /// Rows compared.
    pub samples: u64,
    /// Cosine similarity of the flattened outputs.
    pub cosine: f64,
    /// Largest absolute difference of any output value.
    pub max_abs_error: f64,
    /// Share of rows whose argmax agrees, for outputs with a class axis.
    pub top1_agreement: Option<f64>,
    /// Whether the inputs were the eval set (true) or seeded random inputs (false).
    pub eval_set: bool,
}

/// Index of the largest value (first on ties).
pub fn argmax(row: &[f64]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |b, (i, v)| if *v > b.1 { (i, *v) } else { b },
        )
        .0
}

/// Classification figures from class scores (`rows × classes`, row-major) or, when `classes` is 1 and
/// the values are labels, from predicted labels.
pub fn classification(scores: &[f64], classes: usize, labels: &[i64], k: usize) -> Classification {
    let rows = labels.len();
    let predicted: Vec<i64> = if classes > 1 {
        scores.chunks(classes).map(|r| argmax(r) as i64).collect()
    } else {
        scores.iter().map(|v| v.round() as i64).collect()
    };
    let topk = (classes > 1).then(|| {
        let k = k.min(classes);
        let hits = scores
            .chunks(classes)
            .zip(labels)
            .filter(|(row, y)| {
                let Some(score) = usize::try_from(**y).ok().and_then(|y| row.get(y)) else {
                    return false;
                };
                // The label is in the top k when fewer than k scores beat it.
                row.iter().filter(|v| *v > score).count() < k
            })
            .count();
        hits as f64 / rows.max(1) as f64
    });
    let mut class_ids: Vec<i64> = labels.iter().chain(&predicted).copied().collect();
    class_ids.sort_unstable();
    class_ids.dedup();
    let mut per_class = Vec::with_capacity(class_ids.len());
    for c in class_ids {
        let tp = predicted
            .iter()
            .zip(labels)
            .filter(|(p, y)| **p == c && **y == c)
            .count() as f64;
        let pred_c = predicted.iter().filter(|p| **p == c).count() as f64;
        let support = labels.iter().filter(|y| **y == c).count();
        let precision = if pred_c > 0.0 { tp / pred_c } else { 0.0 };
        let recall = if support > 0 {
            tp / support as f64
        } else {
            0.0
        };
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        per_class.push(ClassFigures {
            class: c,
            precision,
            recall,
            f1,
            support: support as u64,
        });
    }
    let n = per_class.len().max(1) as f64;
    let correct = predicted.iter().zip(labels).filter(|(p, y)| p == y).count();
    Classification {
        samples: rows as u64,
        top1: correct as f64 / rows.max(1) as f64,
        topk,
        k: k.min(classes.max(1)) as u32,
        macro_precision: per_class.iter().map(|c| c.precision).sum::<f64>() / n,
        macro_recall: per_class.iter().map(|c| c.recall).sum::<f64>() / n,
        macro_f1: per_class.iter().map(|c| c.f1).sum::<f64>() / n,
        per_class,
    }
}

/// MAE and RMSE.
pub fn regression(predicted: &[f64], truth: &[f64]) -> Regression {
    let n = predicted.len().min(truth.len());
    let (mut abs, mut sq) = (0.0, 0.0);
    for (p, t) in predicted.iter().zip(truth) {
        abs += (p - t).abs();
        sq += (p - t) * (p - t);
    }
    let d = n.max(1) as f64;
    Regression {
        samples: n as u64,
        mae: abs / d,
        rmse: (sq / d).sqrt(),
    }
}

/// Fidelity of `outputs` to `base` (same shape, `rows × width`, row-major).
pub fn fidelity(outputs: &[f64], base: &[f64], width: usize, eval_set: bool) -> Fidelity {
    let (mut dot, mut na, mut nb, mut max_abs) = (0.0, 0.0, 0.0, 0.0f64);
    for (a, b) in outputs.iter().zip(base) {
        dot += a * b;
        na += a * a;
        nb += b * b;
        max_abs = max_abs.max((a - b).abs());
    }
    let cosine = if na > 0.0 && nb > 0.0 {
        dot / (na.sqrt() * nb.sqrt())
    } else if na == nb {
        1.0
    } else {
        0.0
    };
    let rows = outputs.len() / width.max(1);
    let top1_agreement = (width > 1).then(|| {
        let same = outputs
            .chunks(width)
            .zip(base.chunks(width))
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count();
        same as f64 / rows.max(1) as f64
    });
    Fidelity {
        samples: rows as u64,
        cosine,
        max_abs_error: max_abs,
        top1_agreement,
        eval_set,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perplexity_is_the_exponent_of_the_mean_next_token_nll() {
        // Uniform logits over 4 tokens: perplexity 4, whatever the targets.
        let mut s = NextTokenSums::default();
        s.add(&[0.0; 12], 4, &[1, 2, 3]).unwrap();
        let lm = s.finish().unwrap();
        assert!((lm.perplexity - 4.0).abs() < 1e-9, "{lm:?}");
        // The ignore index is skipped; a label past the vocabulary is refused.
        let mut s = NextTokenSums::default();
        s.add(&[0.0; 12], 4, &[1, -100, 3]).unwrap();
        assert_eq!(s.finish().unwrap().tokens, 2);
        assert!(
            s.add(&[0.0; 8], 4, &[1, 4])
                .unwrap_err()
                .contains("label 4")
        );
        // A confident right guess and a confident wrong one.
        let mut s = NextTokenSums::default();
        s.add(&[10.0, 0.0, 0.0, 10.0], 2, &[0, 0]).unwrap();
        let lm = s.finish().unwrap();
        assert_eq!((lm.tokens, lm.sequences), (2, 1));
        assert!((lm.next_token_accuracy - 0.5).abs() < 1e-12);
        let nll = (1.0f64 + (-10.0f64).exp()).ln() + (10.0 + (1.0f64 + (-10.0f64).exp()).ln());
        assert!((lm.perplexity - (nll / 2.0).exp()).abs() < 1e-6, "{lm:?}");
        assert!(NextTokenSums::default().finish().is_none());
    }

    #[test]
    fn classification_figures_match_a_hand_count() {
        // 3 classes, 6 rows. Predictions: 0,0,1,1,2,0; labels: 0,1,1,1,2,2.
        let scores = [
            0.9, 0.1, 0.0, //
            0.6, 0.3, 0.1, //
            0.1, 0.8, 0.1, //
            0.2, 0.7, 0.1, //
            0.1, 0.2, 0.7, //
            0.5, 0.1, 0.4,
        ];
        let labels = [0, 1, 1, 1, 2, 2];
        let c = classification(&scores, 3, &labels, 2);
        assert!((c.top1 - 4.0 / 6.0).abs() < 1e-12);
        // Row 1's label 1 is second (in top 2), row 5's label 2 is second: all six in the top 2.
        assert_eq!(c.topk, Some(1.0));
        let c0 = &c.per_class[0];
        assert!((c0.precision - 1.0 / 3.0).abs() < 1e-12 && (c0.recall - 1.0).abs() < 1e-12);
        let c1 = &c.per_class[1];
        assert!((c1.precision - 1.0).abs() < 1e-12 && (c1.recall - 2.0 / 3.0).abs() < 1e-12);
        let c2 = &c.per_class[2];
        assert!((c2.precision - 1.0).abs() < 1e-12 && (c2.recall - 0.5).abs() < 1e-12);
        let f1 = |p: f64, r: f64| 2.0 * p * r / (p + r);
        let macro_f1 = (f1(1.0 / 3.0, 1.0) + f1(1.0, 2.0 / 3.0) + f1(1.0, 0.5)) / 3.0;
        assert!((c.macro_f1 - macro_f1).abs() < 1e-12);
        assert_eq!(c.per_class.iter().map(|c| c.support).sum::<u64>(), 6);
    }

    #[test]
    fn regression_errors() {
        let r = regression(&[1.0, 2.0, 4.0], &[1.0, 3.0, 2.0]);
        assert!((r.mae - 1.0).abs() < 1e-12);
        assert!((r.rmse - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn fidelity_of_identical_scaled_and_disagreeing_outputs() {
        let a = [1.0, 2.0, 3.0, 3.0, 2.0, 1.0];
        let same = fidelity(&a, &a, 3, true);
        assert!((same.cosine - 1.0).abs() < 1e-12);
        assert_eq!(same.max_abs_error, 0.0);
        assert_eq!(same.top1_agreement, Some(1.0));
        let b = [1.0, 2.0, 3.5, 1.0, 2.0, 3.0];
        let f = fidelity(&a, &b, 3, false);
        assert_eq!(f.top1_agreement, Some(0.5));
        assert!((f.max_abs_error - 2.0).abs() < 1e-12);
        assert!(f.cosine < 0.9);
    }
}
