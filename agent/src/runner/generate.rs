//! The generate scenario: decoder models producing tokens, one request per call sequence (prefill of
//! the prompt in one call, then one call per output token with the KV cache fed back — see
//! [`fleetbench_runtime::decoder`]).
//!
//! Requests are drawn from the run's seed: request `i` has the same prompt length, output length,
//! prompt token ids and sampling seed on every agent, whichever stream runs it. A closed loop runs
//! them back to back on `concurrency` streams (the offline scenario's machinery); an open loop issues
//! them at `request_rate` from a seeded Poisson schedule (the server scenario's machinery), so TTFT and
//! E2E count from each request's scheduled arrival and a backlog cannot hide. Every request produces
//! exactly the asked number of tokens; end-of-sequence is not special.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleetbench_common::config::position_limit_error;
use fleetbench_common::domain::{GenerateConfig, RunConfig};
use fleetbench_common::quality::{self, Quality};
use fleetbench_proto::v1::{RunReport, TelemetryWindow};
use fleetbench_runtime::decoder::{self, DecoderIo, Pick};
use fleetbench_runtime::memory::MemoryState;
use ort::session::Session;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::recorder::{Recorder, TokenRecorder};
use super::scenario::{self, QueryExec, RequestTiming, Target};
use super::{OrtRunner, PreparedTask, RunError, session_count};
use crate::sampler::Sampler;

/// Vocabulary prompt ids are drawn from when the model does not state its size.
const FALLBACK_VOCAB: i64 = 256;

/// One request: its prompt, how many tokens it asks for, and how they are picked.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt token ids.
    pub prompt: Vec<i64>,
    /// Output tokens asked for.
    pub output_tokens: usize,
    /// Greedy or seeded sampling.
    pub pick: Pick,
}

/// The run's requests, drawn from its seed.
pub struct Requests {
    config: GenerateConfig,
    vocab: i64,
    seed: u64,
    next: AtomicU64,
}

impl Requests {
    /// Requests of `config` with prompt ids below `vocab`, drawn from `seed`.
    pub fn new(config: &GenerateConfig, vocab: i64, seed: u64) -> Self {
        Self {
            config: config.clone(),
            vocab: vocab.max(1),
            seed,
            next: AtomicU64::new(0),
        }
    }

    /// Request `i`: the same for the same seed.
    pub fn request(&self, i: u64) -> Request {
        let mut rng = StdRng::seed_from_u64(
            self.seed ^ i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let len = |rng: &mut StdRng, t: fleetbench_common::domain::TokenLengths| {
            rng.random_range(t.min.max(1)..=t.max.max(t.min.max(1))) as usize
        };
        let prompt_len = len(&mut rng, self.config.prompt_tokens);
        let output_tokens = len(&mut rng, self.config.output_tokens);
        let prompt = (0..prompt_len)
            .map(|_| rng.random_range(0..self.vocab))
            .collect();
        let pick = Pick::new(self.config.temperature, self.config.top_k, rng.random());
        Request {
            prompt,
            output_tokens,
            pick,
        }
    }

    /// The next request of the sequence.
    pub fn next_request(&self) -> Request {
        self.request(self.next.fetch_add(1, Ordering::Relaxed))
    }
}

/// A session generating the run's requests, one per query.
pub struct DecoderExec<'a> {
    /// The session.
    pub session: &'a mut Session,
    /// Its inputs and outputs.
    pub io: &'a DecoderIo,
    /// Where requests come from.
    pub requests: &'a Requests,
    /// Requests per call sequence: a static batch.
    pub batch: usize,
}

impl QueryExec for DecoderExec<'_> {
    fn run(&mut self) -> Result<(), RunError> {
        self.run_request().map(|_| ())
    }

    fn run_request(&mut self) -> Result<Vec<RequestTiming>, RunError> {
        let batch: Vec<Request> = (0..self.batch)
            .map(|_| self.requests.next_request())
            .collect();
        let prompts: Vec<&[i64]> = batch.iter().map(|r| r.prompt.as_slice()).collect();
        let lengths: Vec<usize> = batch.iter().map(|r| r.output_tokens).collect();
        let mut picks: Vec<Pick> = batch.iter().map(|r| r.pick.clone()).collect();
        let made = if self.batch == 1 {
            vec![decoder::generate_with(
                self.session,
                self.io,
                prompts[0],
                lengths[0],
                &mut picks[0],
            )?]
        } else {
            decoder::generate_batch(self.session, self.io, &prompts, &lengths, &mut picks)?
        };
        batch
            .iter()
            .zip(made)
            .map(|(r, g)| {
                if g.tokens.len() != r.output_tokens {
                    return Err(RunError::Failed(format!(
                        "a request asked for {} tokens and got {}",
                        r.output_tokens,
                        g.tokens.len()
                    )));
                }
                Ok(RequestTiming {
                    prompt_tokens: r.prompt.len() as u32,
                    token_ready_ns: g.token_ready_ns,
                    lead_ns: 0,
                })
            })
            .collect()
    }
}

impl OrtRunner {
    /// Runs a generate task: sessions, the decoder's inputs and outputs, warm-up requests, the timed
    /// loop with token figures in every window, and the record.
    pub(crate) fn run_generate(
        &self,
        task: &PreparedTask,
        c: &RunConfig,
        emit: &mut dyn FnMut(TelemetryWindow),
        cancel: &AtomicBool,
        started_at: i64,
    ) -> Result<RunReport, RunError> {
        let g = c.generate.clone().unwrap_or_default();
        let batch = c.batch_size.max(1) as usize;
        let t = Instant::now();
        let mut first = self.session(task, c)?;
        let session_create_ns = t.elapsed().as_nanos() as u64;
        let io = DecoderIo::detect(&first).map_err(|e| {
            RunError::Failed(format!(
                "the model is not a decoder the generate scenario can drive: {e}"
            ))
        })?;
        if let Some(e) = position_limit_error(&g, io.max_positions) {
            return Err(RunError::Failed(e));
        }
        let vocab = io.vocab.filter(|v| *v > 0);
        let draw_vocab = vocab.unwrap_or(FALLBACK_VOCAB);
        let t = Instant::now();
        decoder::generate(&mut first, &io, &vec![0; g.prompt_tokens.min as usize], 1)?;
        let first_inference_ns = t.elapsed().as_nanos() as u64;
        let mut sessions = vec![first];
        for _ in 1..session_count(c) {
            sessions.push(self.session(task, c)?);
        }
        // Warm-up requests come from another seed, so the timed phase runs the same requests
        // whatever the warm-up.
        let warm = Requests::new(&g, draw_vocab, c.seed ^ 0x5741_524D);
        {
            let mut execs = execs(&mut sessions, &io, &warm, batch);
            scenario::warm_up(&mut execs, c.warmup_iterations, cancel)?;
        }
        let pages = self.onto_huge_pages();
        let requests = Requests::new(&g, draw_vocab, c.seed);
        let sampler = Sampler::start(
            Duration::from_millis(c.sample_ms.max(10) as u64),
            task.cpus.clone(),
        );
        let mut rec = Recorder::new(
            &task.assignment.run_id,
            Duration::from_millis(c.window_ms as u64),
            c.window_min_queries as u64,
            1,
            Some(sampler),
            emit,
        );
        rec.tokens = Some(TokenRecorder::new(
            g.slo_ttft_ms,
            g.slo_tpot_ms,
            g.slo_e2e_ms,
        ));
        let mut scenario_json = if g.max_rate {
            // The search draws its own requests, so the run at the rate it finds gets the job's
            // sequence from its start, as on every agent.
            let probes = Requests::new(&g, draw_vocab, c.seed ^ 0x5345_4152_4348);
            let found = {
                let mut search = execs(&mut sessions, &io, &probes, batch);
                scenario::find_rate(&mut search, c, cancel, Target::Slo(&g))?
            };
            let mut run = execs(&mut sessions, &io, &requests, batch);
            let final_cfg = scenario::final_config(c, found.rate);
            let s = scenario::server(&mut run, &final_cfg, found.rate, &mut rec, cancel)?;
            let mut j = open_loop_json(found.rate, &s);
            j["max_rate"] = json!(found.rate);
            j["capacity_estimate_rate"] = json!(found.capacity);
            j["search"] = json!(found.steps);
            j
        } else if g.request_rate > 0.0 {
            let mut run = execs(&mut sessions, &io, &requests, batch);
            let s = scenario::server(&mut run, c, g.request_rate, &mut rec, cancel)?;
            open_loop_json(g.request_rate, &s)
        } else {
            let mut run = execs(&mut sessions, &io, &requests, batch);
            scenario::offline(&mut run, c, &mut rec, cancel)?;
            json!({ "loop": "closed" })
        };
        let (_, elapsed) = rec.finish();
        // While the sessions hold the weights and the KV cache.
        let memory = MemoryState::now();
        let tokens = rec.tokens.as_ref().expect("set above");
        scenario_json["scenario"] = json!("generate");
        scenario_json["streams"] = json!(sessions.len());
        scenario_json["batch_size"] = json!(batch);
        scenario_json["prompt_tokens"] = json!(tokens.total_prompt_tokens);
        scenario_json["output_tokens"] = json!(tokens.total_output_tokens);
        scenario_json["good_requests"] = json!(tokens.total_good);
        scenario_json["kv_bytes_per_token"] = json!(io.kv_bytes_per_token());
        scenario_json["layers"] = json!(io.layers());
        scenario_json["vocab"] = json!(vocab);
        scenario_json["max_positions"] = json!(io.max_positions);
        if vocab.is_none() {
            scenario_json["note"] = json!(format!(
                "the model does not state its vocabulary size: prompt ids drawn below {FALLBACK_VOCAB}"
            ));
        }
        let (queries, late, dropped) = (rec.queries, rec.late, rec.dropped);
        drop(rec);
        let mut quality = match &task.base_model_path {
            Some(base) if !c.skip_accuracy => {
                Some(self.generative_fidelity(c, &mut sessions[0], &io, base, draw_vocab)?)
            }
            _ => None,
        };
        if let Some((inputs, labels)) = task.eval.as_ref().filter(|_| !c.skip_accuracy) {
            let lm = language_modeling(&mut sessions[0], &io, inputs, labels)?;
            quality.get_or_insert_with(Quality::default).language = lm;
        }
        drop(sessions);
        let probe = vec![0; (g.prompt_tokens.min as usize).min(8)];
        let used = self.providers_used_by(task, c, &mut |session| {
            let io = DecoderIo::detect(session)?;
            decoder::generate(session, &io, &probe, 2)?;
            Ok(())
        })?;
        let record = self.record(task, c, &used, (&memory, pages.as_ref()), started_at);
        Ok(RunReport {
            queries,
            samples: queries,
            elapsed_ns: elapsed.as_nanos() as u64,
            session_create_ns,
            first_inference_ns,
            // Next-token accuracy over the token eval set stands for accuracy in rankings.
            accuracy: quality
                .as_ref()
                .and_then(|q| q.language.as_ref())
                .map(|l| l.next_token_accuracy),
            eval_samples: quality
                .as_ref()
                .and_then(|q| q.language.as_ref())
                .map_or(0, |l| l.tokens),
            record_json: record.to_string(),
            effective_config: Some(c.into()),
            late_queries: late,
            dropped_queries: dropped,
            scenario_json: scenario_json.to_string(),
            quality_json: quality
                .map(|q| serde_json::to_string(&q).unwrap_or_default())
                .unwrap_or_default(),
        })
    }

    /// Fidelity of a derived variant (int4, int8, fp16 …) to its base with teacher forcing: both
    /// read the same seeded token sequence in one call, and every position's next-token logits are
    /// compared (top-1 agreement, cosine of all logits, largest difference).
    fn generative_fidelity(
        &self,
        c: &RunConfig,
        session: &mut Session,
        io: &DecoderIo,
        base_path: &std::path::Path,
        vocab: i64,
    ) -> Result<Quality, RunError> {
        let mut base = self.builder(c)?.commit_from_file(base_path).map_err(|e| {
            RunError::Failed(format!(
                "cannot load the base variant {}: {e}",
                base_path.display()
            ))
        })?;
        let base_io = DecoderIo::detect(&base)
            .map_err(|e| RunError::Failed(format!("the base variant is not a decoder: {e}")))?;
        let limit = [io.max_positions, base_io.max_positions]
            .into_iter()
            .flatten()
            .min()
            .map_or(FIDELITY_TOKENS, |m| (m as usize).saturating_sub(1))
            .clamp(1, FIDELITY_TOKENS);
        let mut rng = StdRng::seed_from_u64(c.seed ^ 0xF1DE_11E7);
        let tokens: Vec<i64> = (0..limit).map(|_| rng.random_range(0..vocab)).collect();
        let (ours, width) = decoder::prefill_logits(session, io, &tokens)?;
        check_every_position(&ours, width, tokens.len())?;
        let (theirs, base_width) = decoder::prefill_logits(&mut base, &base_io, &tokens)?;
        if width != base_width || ours.len() != theirs.len() {
            return Err(RunError::Failed(format!(
                "fidelity: the variant's logits are {width} wide and its base's {base_width}"
            )));
        }
        let wide = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<_>>();
        Ok(Quality {
            fidelity: Some(quality::fidelity(&wide(ours), &wide(theirs), width, false)),
            ..Default::default()
        })
    }
}

/// Perplexity and next-token accuracy over a token eval set: `inputs` and `labels` are .npy token
/// ids `[sequences, length]` (labels as Hugging Face takes them for causal language models: the
/// sequence itself, so the same file may serve as both); position t's logits predict `labels[t + 1]`.
/// Sequences longer than the model's positions are cut to fit.
fn language_modeling(
    session: &mut Session,
    io: &DecoderIo,
    inputs: &std::path::Path,
    labels: &std::path::Path,
) -> Result<Option<quality::LanguageModeling>, RunError> {
    let read = |p: &std::path::Path, what: &str| {
        fleetbench_runtime::data::read_npy(p)
            .map_err(|e| RunError::Failed(format!("the token eval set's {what}: {e}")))
    };
    let (x, y) = (read(inputs, "inputs")?, read(labels, "labels")?);
    if x.shape.len() != 2 || x.shape != y.shape {
        return Err(RunError::Failed(format!(
            "the token eval set: inputs {:?} and labels {:?} must both be [sequences, length] token ids",
            x.shape, y.shape
        )));
    }
    let len = io.max_positions.map_or(x.shape[1], |m| {
        x.shape[1].min((m as usize).saturating_sub(1))
    });
    let mut sums = quality::NextTokenSums::default();
    for r in 0..x.shape[0] {
        let row = |a: &fleetbench_runtime::data::HostArray| -> Vec<i64> {
            a.data[r * a.shape[1]..r * a.shape[1] + len]
                .iter()
                .map(|v| *v as i64)
                .collect()
        };
        let (tokens, targets) = (row(&x), row(&y));
        if tokens.len() < 2 {
            continue;
        }
        let (logits, vocab) = decoder::prefill_logits(session, io, &tokens)?;
        check_every_position(&logits, vocab, tokens.len())?;
        sums.add(&logits[..(tokens.len() - 1) * vocab], vocab, &targets[1..])
            .map_err(|e| RunError::Failed(format!("the token eval set: {e}")))?;
    }
    Ok(sums.finish())
}

/// Teacher forcing needs the logits of every position, not only the last.
fn check_every_position(logits: &[f32], vocab: usize, tokens: usize) -> Result<(), RunError> {
    if logits.len() != vocab * tokens {
        return Err(RunError::Failed(format!(
            "quality: the model returned {} logits for {tokens} tokens of a {vocab}-token vocabulary; \
             teacher forcing needs every position's (a model that returns the last position's only \
             cannot be scored this way)",
            logits.len()
        )));
    }
    Ok(())
}

/// Tokens of the seeded sequence the fidelity pass compares (fewer when the model has fewer positions).
const FIDELITY_TOKENS: usize = 128;

/// What an open-loop run reports besides its windows.
fn open_loop_json(rate: f64, s: &scenario::ServerStats) -> serde_json::Value {
    json!({
        "loop": "open",
        "request_rate": rate,
        "scheduled_rate": s.scheduled_qps,
        "achieved_rate": s.achieved_qps,
        "issued": s.issued,
        "dropped": s.dropped,
        "issue_delay_ms": {
            "p50": s.issue_delay_p50_ms,
            "p99": s.issue_delay_p99_ms,
            "max": s.issue_delay_max_ms,
        },
        "service_p99_ms": s.service_p99_ms,
    })
}

fn execs<'a>(
    sessions: &'a mut [Session],
    io: &'a DecoderIo,
    requests: &'a Requests,
    batch: usize,
) -> Vec<Box<dyn QueryExec + 'a>> {
    sessions
        .iter_mut()
        .map(|session| {
            Box::new(DecoderExec {
                session,
                io,
                requests,
                batch,
            }) as Box<dyn QueryExec + 'a>
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetbench_common::domain::TokenLengths;

    #[test]
    fn requests_are_drawn_from_the_seed_within_their_lengths() {
        let g = GenerateConfig {
            prompt_tokens: TokenLengths { min: 4, max: 40 },
            output_tokens: TokenLengths::fixed(7),
            ..Default::default()
        };
        let a = Requests::new(&g, 100, 42);
        let b = Requests::new(&g, 100, 42);
        let mut lengths = std::collections::BTreeSet::new();
        for i in 0..200 {
            let (x, y) = (a.request(i), b.request(i));
            assert_eq!(x.prompt, y.prompt);
            assert!((4..=40).contains(&x.prompt.len()));
            assert!(x.prompt.iter().all(|t| (0..100).contains(t)));
            assert_eq!(x.output_tokens, 7);
            lengths.insert(x.prompt.len());
        }
        assert!(lengths.len() > 10, "lengths are drawn: {lengths:?}");
        assert_ne!(
            Requests::new(&g, 100, 43).request(0).prompt,
            a.request(0).prompt
        );
    }

    #[test]
    fn the_position_limit_names_both_lengths() {
        let g = GenerateConfig {
            prompt_tokens: TokenLengths { min: 32, max: 256 },
            output_tokens: TokenLengths::fixed(64),
            ..Default::default()
        };
        assert!(position_limit_error(&g, Some(512)).is_none());
        assert!(position_limit_error(&g, None).is_none());
        let e = position_limit_error(&g, Some(300)).unwrap();
        assert!(
            e.contains("256 + 64 = 320") && e.contains("300 positions"),
            "{e}"
        );
    }
}
