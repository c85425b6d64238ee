//! The inference engine of `serve`: one thread owns the model, the vision encoder and the KV cache, and runs the
//! conversations of up to `--parallel` slots together (continuous batching, as llama.cpp's server does):
//!
//! - Every step decodes the next token of every generating slot in ONE batch (each slot its own sequences of
//!   the shared cache; a beam search is several sequences), and the next chunk of one slot's prompt joins the
//!   same batch, so a new request starts while the others go on and a finished one leaves at once.
//! - Slot `i` owns sequences `i*width .. (i+1)*width` of the cache. After an answer the slot keeps its
//!   conversation's cells (sequence `i*width`); a new request goes to the idle slot whose cells share the
//!   longest prefix with it, and a prefix held by another slot is shared cell by cell (`seq_cp_prefix`: no
//!   K/V data is copied or recomputed). Prefixes never end part way into an image.
//! - A request is admitted only when the cache can hold its whole answer next to the answers already running
//!   (prompt + beams x max_tokens each); idle slots' cells are given up, least recently used first, to make room.
//! - Decisions per token are `generate::Decoder`'s, the same as `run` and `chat`, so an answer does not depend on
//!   which other requests shared its batches.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use tokio::sync::mpsc;

use super::prompt::{self, Item, Prompt};
use super::stop::{truncate_at_stop, StopMatcher};
use crate::cache::image::ImageCache;
use crate::generate::{Decoder, Generated};
use crate::llm::{Batch, Input, Session, MAX_SEQ};
use crate::sampling::GenerationConfig;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::vision::{ImageEmbedding, VisionEncoder};

/// An image of a request: the identity of its decoded pixels, and HF's `pixel_values` to encode or, when the image
/// cache held them (an uploaded image's id), its embeddings.
pub struct PreparedImage {
    pub hash: [u8; 32],
    pub pixels: Vec<f32>,
    pub emb: Option<ImageEmbedding>,
}

/// An image to encode into the image cache (`POST /v1/images`), sent on a channel of its own.
pub struct EncodeJob {
    pub hash: [u8; 32],
    pub pixels: Vec<f32>,
    pub reply: tokio::sync::oneshot::Sender<Result<Encoded, String>>,
}

/// An image put in the cache: already there, or encoded in `ms`.
pub struct Encoded {
    pub cached: bool,
    pub ms: f64,
}

/// A validated request, ready to run.
pub struct Job {
    pub prompt: Prompt,
    /// One per `Item::Image` of the prompt, in order.
    pub images: Vec<PreparedImage>,
    pub cfg: GenerationConfig,
    pub stops: Vec<String>,
    pub stream: bool,
    /// OpenAI's `user`: cached-token counts are reported only for prefixes this user's requests made.
    pub owner: Option<String>,
    pub events: mpsc::UnboundedSender<Event>,
    /// When it was queued.
    pub queued_at: Instant,
}

/// What the engine tells the request's handler.
pub enum Event {
    /// Text of the first answer that became final (only when streaming).
    Delta(String),
    Done(Box<Finished>),
    /// The request failed on the server's side (HTTP 500).
    Error(String),
}

pub struct Choice {
    pub text: String,
    /// `stop` (an end token or a stop string) or `length`.
    pub finish_reason: &'static str,
}

pub struct Finished {
    pub choices: Vec<Choice>,
    pub usage: Usage,
}

#[derive(Clone, Debug, Default)]
pub struct Usage {
    /// Positions of the prompt (an image counts its image tokens).
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt positions taken from the cache, as far as this request's `user` made them: reuse of another
    /// user's conversation is reported as computed (here and in the two fields below), so the counts do not
    /// tell one user what another asked.
    pub cached_tokens: usize,
    /// Prompt positions computed for this request.
    pub prefilled_tokens: usize,
    pub images_encoded: usize,
    /// Images whose embeddings came from the image cache (not encoded).
    pub image_cache_hits: usize,
    pub image_encode_ms: f64,
    /// From admission to the first generated token (image encoding and prefill).
    pub prompt_ms: f64,
    pub predicted_ms: f64,
    /// Waiting for a slot.
    pub queued_ms: f64,
}

/// Counters the HTTP side reads (`/health`, `/stats`).
#[derive(Default)]
pub struct Stats {
    pub slots: AtomicUsize,
    pub busy: AtomicUsize,
    /// Requests waiting for a slot (in the queue or held by the engine).
    pub queued: AtomicUsize,
    pub steps: AtomicU64,
    /// Steps whose batch held the tokens of two or more requests.
    pub shared_steps: AtomicU64,
    /// Most requests, and most rows, in one step's batch.
    pub max_requests_per_step: AtomicUsize,
    pub max_rows_per_step: AtomicUsize,
    pub tokens_generated: AtomicU64,
    /// Microseconds spent in the model's forward passes (batches of tokens or image embeddings) and in the
    /// vision encoder: the rest of the engine's time is scheduling, sampling and detokenizing.
    pub forward_us: AtomicU64,
    pub encode_us: AtomicU64,
    pub prompt_positions_computed: AtomicU64,
    pub prompt_positions_reused: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    /// Requests answered 503 because the queue was full (counted by the HTTP side).
    pub rejected_busy: AtomicU64,
}

impl Stats {
    pub fn to_json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let u = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        serde_json::json!({
            "slots": u(&self.slots), "slots_busy": u(&self.busy), "queued": u(&self.queued),
            "steps": g(&self.steps), "shared_steps": g(&self.shared_steps),
            "max_requests_per_step": u(&self.max_requests_per_step), "max_rows_per_step": u(&self.max_rows_per_step),
            "tokens_generated": g(&self.tokens_generated),
            "forward_us": g(&self.forward_us), "encode_us": g(&self.encode_us),
            "prompt_positions_computed": g(&self.prompt_positions_computed),
            "prompt_positions_reused": g(&self.prompt_positions_reused),
            "completed": g(&self.completed), "cancelled": g(&self.cancelled), "failed": g(&self.failed),
            "rejected_busy": g(&self.rejected_busy),
        })
    }
}

/// What remains of a prompt to compute.
enum Pending {
    Tokens(VecDeque<u32>),
    /// An image: its pixels until a step encodes them, then its embeddings, `done` rows of them computed.
    Image {
        pixels: Vec<f32>,
        emb: Option<ImageEmbedding>,
        hash: [u8; 32],
        n_tokens: usize,
        done: usize,
    },
}

impl Pending {
    fn positions(&self) -> usize {
        match self {
            Pending::Tokens(t) => t.len(),
            Pending::Image { n_tokens, done, .. } => n_tokens - done,
        }
    }
}

/// A request being answered in a slot.
struct Task<'m> {
    job: Job,
    /// Next position of the slot's sequences.
    pos: i32,
    pending: VecDeque<Pending>,
    /// Set once the prompt is computed.
    decoder: Option<Decoder>,
    /// The tokens to feed next, one per live sequence.
    feed: Vec<u32>,
    text: StreamDecoder<'m>,
    stop: StopMatcher,
    /// Text of the first answer released so far.
    released: String,
    usage: Usage,
    admitted: Instant,
    first_token: Option<Instant>,
}

impl Task<'_> {
    /// Cells this task may still claim: the rest of its prompt, and one per sequence per token to come.
    fn reserve(&self) -> usize {
        let prompt: usize = self.pending.iter().map(Pending::positions).sum();
        let (seqs, steps) = match &self.decoder {
            Some(d) => (d.n_seqs(), d.steps()),
            None => (self.job.cfg.num_beams.max(1), 0),
        };
        prompt + seqs * self.job.cfg.max_new_tokens.unwrap_or(1).saturating_sub(steps)
    }
}

/// Which held conversation: a slot's, or a parked one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    Slot(usize),
    Parked(usize),
}

/// A conversation kept after its slot moved on: a sequence of its own past the slots' sequences.
struct Parked {
    seq: usize,
    items: Vec<Item>,
    owner: Option<String>,
    last_used: u64,
}

struct Slot<'m> {
    /// First sequence of the slot; it holds the cached conversation.
    base: usize,
    /// What sequence `base` holds, in order.
    items: Vec<Item>,
    /// The `user` of the request that made `items`.
    owner: Option<String>,
    last_used: u64,
    task: Option<Task<'m>>,
}

pub struct Engine<'m> {
    tok: &'m Tokenizer,
    session: Session<'m>,
    encoder: Option<VisionEncoder<'m>>,
    /// Embeddings of images seen or uploaded, shared with the HTTP side (which looks up uploaded images' ids).
    images: Arc<ImageCache>,
    n_image_tokens: usize,
    slots: Vec<Slot<'m>>,
    /// Sequences per slot (the most beams a request may use).
    width: usize,
    /// Sequences for parked conversations (those past the slots'), and the ones in use.
    parked_seqs: Vec<usize>,
    parked: Vec<Parked>,
    /// Cells parked conversations may hold on their own (`--cache-ram`).
    park_cells: usize,
    stats: Arc<Stats>,
    tick: u64,
    /// The model files, checked before each step: one modified in place fails the work instead of crashing the
    /// server when a step reads a page that no longer exists (ggml::FileWatch).
    files: Vec<ggml::FileWatch>,
    /// The RPC servers holding blocks of the model: once one has failed, the work fails and new work is refused.
    rpc: Vec<ggml::rpc::Health>,
}

/// Why a task ends.
enum End {
    /// The decoder finished (an end token or the length limit) or a stop string was found.
    Natural,
    /// The client went away.
    Cancelled,
    Failed(String),
}

impl<'m> Engine<'m> {
    pub fn new(
        tok: &'m Tokenizer,
        session: Session<'m>,
        encoder: Option<VisionEncoder<'m>>,
        images: Arc<ImageCache>,
        parallel: usize,
        width: usize,
        cache_ram: usize,
        stats: Arc<Stats>,
    ) -> Engine<'m> {
        let n_image_tokens = encoder.as_ref().map_or(0, |e| e.model.hp.n_image_tokens());
        let slots = (0..parallel)
            .map(|i| Slot { base: i * width, items: Vec::new(), owner: None, last_used: 0, task: None })
            .collect();
        stats.slots.store(parallel, Ordering::Relaxed);
        let cell_bytes = session.cache.bytes() / session.cache.n_cells().max(1);
        let park_cells = cache_ram / cell_bytes.max(1);
        let parked_seqs = (parallel * width..MAX_SEQ).collect();
        Engine {
            tok,
            session,
            encoder,
            images,
            n_image_tokens,
            slots,
            width,
            parked_seqs,
            parked: Vec::new(),
            park_cells,
            stats,
            tick: 0,
            files: Vec::new(),
            rpc: Vec::new(),
        }
    }

    /// Checks `files` (the loaded model's) and `rpc` (the servers holding some of its blocks) before each step.
    pub fn watch(mut self, files: Vec<ggml::FileWatch>, rpc: Vec<ggml::rpc::Health>) -> Self {
        self.files = files;
        self.rpc = rpc;
        self
    }

    /// Why the model can no longer be used: a file changed on disk, or an RPC server failed.
    fn unusable(&self) -> Option<String> {
        super::unusable(&self.files, &self.rpc)
    }

    /// Serves jobs until every sender is gone.
    /// Serves chat jobs and image uploads until every sender is gone. At most one upload is encoded between two
    /// steps, so uploads never hold up running answers for more than one encode, and they wait in their own
    /// bounded queue, not in the chat requests'.
    pub fn run(mut self, mut jobs: mpsc::Receiver<Job>, mut uploads: mpsc::Receiver<EncodeJob>) {
        // Waiting for either queue when idle (a small runtime of this thread's own, for `select!`).
        let idle_wait = match tokio::runtime::Builder::new_current_thread().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("engine: cannot start: {e}");
                return;
            }
        };
        let mut uploads_open = true;
        let mut waiting: Option<Job> = None;
        loop {
            if uploads_open {
                match uploads.try_recv() {
                    Ok(u) => {
                        self.guarded(|e| {
                            e.encode_upload(u);
                            None
                        });
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => uploads_open = false,
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
            }
            // Take work: block when idle, else look without waiting, and only when a slot is free (a job stays in
            // the bounded queue until it can start, so the queue's bound is what clients see).
            let free = self.slots.iter().any(|s| s.task.is_none());
            if waiting.is_none() && free {
                let idle = self.slots.iter().all(|s| s.task.is_none());
                if idle {
                    let next = idle_wait.block_on(async {
                        tokio::select! {
                            j = jobs.recv() => Some(j),
                            Some(u) = uploads.recv(), if uploads_open => { self.guarded(|e| { e.encode_upload(u); None }); None }
                        }
                    });
                    match next {
                        Some(Some(j)) => waiting = Some(j),
                        Some(None) => return,
                        None => continue,
                    }
                } else {
                    waiting = jobs.try_recv().ok();
                }
            }
            // Admit as many as fit; a job that does not fit yet waits (the queue behind it stays bounded).
            while let Some(job) = waiting.take() {
                if job.events.is_closed() {
                    self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                    self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                } else if let Some(msg) = self.unusable() {
                    self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                    let _ = job.events.send(Event::Error(msg));
                } else if let Some(job) = self.guarded(|e| e.admit(job)) {
                    if self.slots.iter().all(|s| s.task.is_none()) {
                        // Nothing runs that could make room: it can never fit (the HTTP side checks the context,
                        // so this is a bug, reported rather than waited on forever).
                        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                        let _ = job.events.send(Event::Error("the request does not fit the KV cache".into()));
                    } else {
                        waiting = Some(job);
                        break;
                    }
                }
                if self.slots.iter().any(|s| s.task.is_none()) {
                    waiting = jobs.try_recv().ok();
                }
            }
            self.cancel_gone();
            if self.slots.iter().any(|s| s.task.is_some()) {
                self.guarded(|e| {
                    if let Some(msg) = e.unusable() {
                        e.fail_all(&msg);
                    } else if let Err(e2) = e.step() {
                        e.fail_all(&format!("{e2:#}"));
                    }
                    None
                });
            }
        }
    }

    /// `POST /v1/images`: the image's embeddings into the cache (not encoded again if already there).
    fn encode_upload(&mut self, job: EncodeJob) {
        let n_embd = self.session.model.hp.n_embd;
        let changed = self.unusable();
        let result = (|| {
            if let Some(msg) = changed {
                return Err(msg);
            }
            let enc = self.encoder.as_mut().ok_or("the server has no vision encoder (start it with --mmproj)")?;
            let n_tokens = enc.model.hp.n_image_tokens();
            if self.images.contains(&job.hash, n_tokens, n_embd) {
                return Ok(Encoded { cached: true, ms: 0.0 });
            }
            let started = Instant::now();
            let e = enc.encode_pixels(&job.pixels, 1).map_err(|e| format!("encoding the image: {e:#}"))?;
            let e = e.into_iter().next().ok_or("no embeddings")?;
            self.stats.encode_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            self.images.put(&job.hash, &e);
            Ok(Encoded { cached: false, ms: started.elapsed().as_secs_f64() * 1e3 })
        })();
        let _ = job.reply.send(result.map_err(|e: String| e));
    }

    /// Runs `f`; a panic inside fails every running request (their handlers answer 500) and empties the cache,
    /// and the engine goes on.
    fn guarded(&mut self, f: impl FnOnce(&mut Self) -> Option<Job>) -> Option<Job> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| f(self))) {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                eprintln!("engine: internal error: {}", msg.escape_debug());
                self.fail_all("internal error");
                self.session.cache.clear();
                for s in &mut self.slots {
                    s.items.clear();
                }
                self.parked.clear();
                None
            }
        }
    }

    fn fail_all(&mut self, msg: &str) {
        for i in 0..self.slots.len() {
            if self.slots[i].task.is_some() {
                self.end(i, End::Failed(msg.to_string()));
            }
        }
    }

    fn cancel_gone(&mut self) {
        for i in 0..self.slots.len() {
            if self.slots[i].task.as_ref().is_some_and(|t| t.job.events.is_closed()) {
                self.end(i, End::Cancelled);
            }
        }
    }

    /// Starts `job` in a slot, or gives it back when no slot is free or the cache cannot hold it yet.
    fn admit(&mut self, mut job: Job) -> Option<Job> {
        let Some(_) = self.slots.iter().position(|s| s.task.is_none()) else { return Some(job) };
        let images_in = std::mem::take(&mut job.images);
        let items = &job.prompt.items;
        // The idle slot to run in: the longest own prefix, then the least recently used.
        let target = (0..self.slots.len())
            .filter(|&i| self.slots[i].task.is_none())
            .max_by_key(|&i| {
                (prompt::reusable(&self.slots[i].items, items), std::cmp::Reverse(self.slots[i].last_used))
            })
            .expect("a free slot");
        // What the target holds beyond the new prompt's prefix is parked, not lost.
        if prompt::reusable(&self.slots[target].items, items) < self.slots[target].items.len() {
            self.park(target);
        }
        // The longest prefix held anywhere (a slot or a parked conversation), shared without copying K/V data.
        let mut source = self.best_source(items, target);
        let mut keep = prompt::reusable(self.held(source).1, items);

        let total = prompt::positions(items, self.n_image_tokens);
        let answer = job.cfg.answer_cells();
        let reserved: usize = self.slots.iter().filter_map(|s| s.task.as_ref()).map(Task::reserve).sum();
        let fits = |e: &Self, keep: usize| {
            let need = total - prompt::positions(&items[..keep], e.n_image_tokens) + answer;
            e.session.cache.n_free() >= reserved + need
        };
        loop {
            // The target's cells beyond what is kept are released first.
            self.prepare_target(target, source, keep);
            if fits(self, keep) {
                break;
            }
            // If even giving up every idle conversation would not make room, keep them and wait.
            let idle = self.idle_seqs(target);
            let need = total - prompt::positions(&items[..keep], self.n_image_tokens) + answer;
            if self.session.cache.n_free() + self.session.cache.n_only(idle) < reserved + need {
                self.trim_parked();
                job.images = images_in;
                return Some(job);
            }
            // Then idle conversations, least recently used first.
            if self.evict_one(target, &mut source) {
                continue;
            }
            if keep > 0 {
                // Last resort: start from scratch (the source's cells stay its own).
                keep = 0;
                source = Src::Slot(target);
                continue;
            }
            // Even an empty start does not fit next to the running answers: wait for them.
            self.trim_parked();
            job.images = images_in;
            return Some(job);
        }
        self.trim_parked();

        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        self.stats.busy.fetch_add(1, Ordering::Relaxed);
        let reused = prompt::positions(&items[..keep], self.n_image_tokens);
        // Counts are told only for what the same user's requests made (see `Usage::cached_tokens`).
        let own = job.owner.is_some() && job.owner.as_ref() == self.held(source).2;
        let reported = if own { reused } else { 0 };
        self.stats.prompt_positions_reused.fetch_add(reused as u64, Ordering::Relaxed);
        self.tick += 1;
        if let Src::Parked(k) = source {
            self.parked[k].last_used = self.tick;
        }
        let slot = &mut self.slots[target];
        slot.items.truncate(keep);
        slot.owner = job.owner.clone();
        slot.last_used = self.tick;

        // The part to compute; images are encoded by later steps, one per step, so running answers go on between.
        let admitted = Instant::now();
        let n_images_kept = items[..keep].iter().filter(|i| matches!(i, Item::Image(_))).count();
        let mut pending = VecDeque::new();
        let mut images = images_in.into_iter().skip(n_images_kept);
        let mut tokens = VecDeque::new();
        let mut err = None;
        let mut cache_hits = 0;
        for item in &items[keep..] {
            match *item {
                Item::Token(t) => tokens.push_back(t),
                Item::Image(hash) => {
                    if !tokens.is_empty() {
                        pending.push_back(Pending::Tokens(std::mem::take(&mut tokens)));
                    }
                    let Some(img) = images.next().filter(|_| self.encoder.is_some()) else {
                        err = Some("an image without its pixels or without a vision encoder".to_string());
                        break;
                    };
                    let n_tokens = self.n_image_tokens;
                    // Embeddings the request brought (an uploaded image) or the cache holds are not computed again.
                    let n_embd = self.session.model.hp.n_embd;
                    let emb = img.emb.or_else(|| self.images.get(&hash, n_tokens, n_embd).map(|(e, _)| e));
                    if emb.is_some() {
                        cache_hits += 1;
                    }
                    pending.push_back(Pending::Image { pixels: img.pixels, emb, hash, n_tokens, done: 0 });
                }
            }
        }
        if !tokens.is_empty() {
            pending.push_back(Pending::Tokens(tokens));
        }
        let stop = StopMatcher::new(&job.stops);
        let pos = reused as i32;
        let task = Task {
            pos,
            pending,
            decoder: None,
            feed: Vec::new(),
            text: self.tok.stream(true),
            stop,
            released: String::new(),
            usage: Usage {
                prompt_tokens: total,
                cached_tokens: reported,
                prefilled_tokens: total - reported,
                images_encoded: if own { 0 } else { n_images_kept },
                image_cache_hits: cache_hits,
                queued_ms: admitted.duration_since(job.queued_at).as_secs_f64() * 1e3,
                ..Usage::default()
            },
            admitted,
            first_token: None,
            job,
        };
        self.slots[target].task = Some(task);
        if let Some(e) = err {
            self.end(target, End::Failed(e));
        }
        None
    }

    /// A conversation held in the cache: a slot's (its first sequence) or a parked one.
    fn held(&self, src: Src) -> (usize, &[Item], Option<&String>) {
        match src {
            Src::Slot(i) => (self.slots[i].base, &self.slots[i].items, self.slots[i].owner.as_ref()),
            Src::Parked(k) => (self.parked[k].seq, &self.parked[k].items, self.parked[k].owner.as_ref()),
        }
    }

    /// The held conversation sharing the longest prefix with `items` (the target itself on a tie).
    fn best_source(&self, items: &[Item], target: usize) -> Src {
        let slots = (0..self.slots.len()).map(Src::Slot);
        let parked = (0..self.parked.len()).map(Src::Parked);
        slots
            .chain(parked)
            .max_by_key(|&s| (prompt::reusable(self.held(s).1, items), s == Src::Slot(target)))
            .expect("at least one slot")
    }

    /// Makes the target slot's sequences hold exactly the first `keep` items of the new prompt: its own cells cut
    /// back, or (when another conversation holds a longer prefix) that one's cells shared.
    fn prepare_target(&mut self, target: usize, source: Src, keep: usize) {
        let tbase = self.slots[target].base;
        for s in tbase + 1..tbase + self.width {
            self.session.cache.seq_rm(s);
        }
        if source == Src::Slot(target) {
            let keep_pos = prompt::positions(&self.slots[target].items[..keep], self.n_image_tokens);
            self.session.cache.seq_truncate(tbase, keep_pos as i32);
            self.slots[target].items.truncate(keep);
        } else {
            let (sbase, sitems, _) = self.held(source);
            let keep_pos = prompt::positions(&sitems[..keep], self.n_image_tokens);
            let kept = sitems[..keep].to_vec();
            let owner = self.held(source).2.cloned();
            self.session.cache.seq_cp_prefix(sbase, tbase, keep_pos as i32);
            self.slots[target].items = kept;
            self.slots[target].owner = owner;
        }
    }

    /// Keeps an idle slot's conversation in a parked sequence (its cells gain a sequence; nothing is copied),
    /// giving up the least recently used parked one if every parked sequence is taken (`admit` trims the parked
    /// conversations to `--cache-ram` once the target is cut back).
    fn park(&mut self, slot: usize) {
        if self.slots[slot].items.is_empty() || self.parked_seqs.is_empty() {
            return;
        }
        let seq = match self.parked_seqs.iter().copied().find(|s| self.parked.iter().all(|p| p.seq != *s)) {
            Some(s) => s,
            None => {
                let lru = (0..self.parked.len()).min_by_key(|&k| self.parked[k].last_used).expect("all taken");
                let p = self.parked.swap_remove(lru);
                self.session.cache.seq_rm(p.seq);
                p.seq
            }
        };
        let s = &self.slots[slot];
        self.session.cache.seq_cp(s.base, seq);
        self.parked.push(Parked { seq, items: s.items.clone(), owner: s.owner.clone(), last_used: s.last_used });
    }

    /// The sequences of idle conversations that could be given up for a request going to `target`.
    fn idle_seqs(&self, target: usize) -> u64 {
        let slot_bits = |base: usize| ((1u64 << self.width) - 1) << base;
        let idle = (0..self.slots.len())
            .filter(|&i| i != target && self.slots[i].task.is_none())
            .fold(0u64, |m, i| m | slot_bits(self.slots[i].base));
        self.parked.iter().fold(idle, |m, p| m | (1 << p.seq))
    }

    /// Gives up parked conversations, least recently used first, until the cells only they hold fit
    /// `--cache-ram`.
    fn trim_parked(&mut self) {
        let mask = |e: &Self| e.parked.iter().fold(0u64, |m, p| m | (1 << p.seq));
        while !self.parked.is_empty() && self.session.cache.n_only(mask(self)) > self.park_cells {
            let lru = (0..self.parked.len()).min_by_key(|&k| self.parked[k].last_used).expect("non-empty");
            let p = self.parked.swap_remove(lru);
            self.session.cache.seq_rm(p.seq);
        }
    }

    /// Gives up the least recently used idle conversation (an idle slot's or a parked one) other than the
    /// target's and the source's; false if there is none.
    fn evict_one(&mut self, target: usize, source: &mut Src) -> bool {
        let idle_slots = (0..self.slots.len())
            .filter(|&i| self.slots[i].task.is_none() && !self.slots[i].items.is_empty())
            .map(|i| (self.slots[i].last_used, Src::Slot(i)));
        let parked = (0..self.parked.len()).map(|k| (self.parked[k].last_used, Src::Parked(k)));
        let victim = idle_slots
            .chain(parked)
            .filter(|&(_, s)| s != *source && s != Src::Slot(target))
            .min_by_key(|&(t, _)| t)
            .map(|(_, s)| s);
        match victim {
            Some(Src::Slot(i)) => self.evict(i),
            Some(Src::Parked(k)) => {
                // `swap_remove` moves the last entry to `k`: follow it if it is the source.
                if *source == Src::Parked(self.parked.len() - 1) {
                    *source = Src::Parked(k);
                }
                let p = self.parked.swap_remove(k);
                self.session.cache.seq_rm(p.seq);
            }
            None => return false,
        }
        true
    }

    /// An idle slot gives up its cached conversation.
    fn evict(&mut self, slot: usize) {
        let base = self.slots[slot].base;
        for s in base..base + self.width {
            self.session.cache.seq_rm(s);
        }
        self.slots[slot].items.clear();
        self.slots[slot].owner = None;
    }

    /// One batch: the next token of every generating slot, and one chunk of one slot's prompt.
    fn step(&mut self) -> Result<()> {
        let n_ubatch = self.session.n_ubatch();
        let n_vocab = self.session.model.hp.n_vocab;
        let (mut ids, mut pos, mut seq, mut want) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // (slot, rows) of the generating slots, in batch order.
        let mut generating = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let Some(t) = &s.task else { continue };
            if t.decoder.is_some() && !t.feed.is_empty() {
                for (k, &id) in t.feed.iter().enumerate() {
                    ids.push(id);
                    pos.push(t.pos);
                    seq.push(s.base + k);
                    want.push(true);
                }
                generating.push((i, t.feed.len()));
            }
        }
        // The prompt chunk: the slot admitted first among those still prefilling.
        let prefilling = (0..self.slots.len())
            .filter(|&i| self.slots[i].task.as_ref().is_some_and(|t| t.decoder.is_none()))
            .min_by_key(|&i| self.slots[i].task.as_ref().map(|t| t.admitted));
        let mut text_chunk = None;
        let mut image_slot = None;
        let mut encode_slot = None;
        if let Some(i) = prefilling {
            let s = &self.slots[i];
            let t = s.task.as_ref().expect("prefilling");
            match t.pending.front() {
                Some(Pending::Tokens(toks)) => {
                    let n = toks.len().min(n_ubatch - ids.len());
                    if n > 0 {
                        let last = n == toks.len() && t.pending.len() == 1;
                        for (k, &id) in toks.iter().take(n).enumerate() {
                            ids.push(id);
                            pos.push(t.pos + k as i32);
                            seq.push(s.base);
                            want.push(last && k + 1 == n);
                        }
                        text_chunk = Some((i, n, last));
                    }
                }
                Some(Pending::Image { emb: None, .. }) => encode_slot = Some(i),
                Some(Pending::Image { .. }) => image_slot = Some(i),
                None => {}
            }
        }
        if !ids.is_empty() {
            if !want.iter().any(|&w| w) {
                // A middle chunk of a prompt alone: the graph needs one output row, which is ignored.
                *want.last_mut().expect("rows") = true;
            }
            let n_rows = ids.len();
            let started = Instant::now();
            let out = self.session.decode(&Batch { input: Input::Tokens(&ids), pos, seq, logits: want })?;
            self.stats.forward_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            record_step(&self.stats, generating.len() + text_chunk.is_some() as usize, n_rows);
            let mut rows = out.chunks(n_vocab);
            for &(i, k) in &generating {
                let r: Vec<&[f32]> = rows.by_ref().take(k).collect();
                let s = &mut self.slots[i];
                let t = s.task.as_mut().expect("generating");
                t.pos += 1;
                // A sampled answer's tokens stay reusable; beams are settled when they end.
                if !t.decoder.as_ref().is_some_and(Decoder::is_beams) {
                    s.items.push(Item::Token(t.feed[0]));
                }
                self.stats.tokens_generated.fetch_add(k as u64, Ordering::Relaxed);
                self.advance(i, &r);
            }
            if let Some((i, n, last)) = text_chunk {
                let s = &mut self.slots[i];
                let t = s.task.as_mut().expect("prefilling");
                let Some(Pending::Tokens(toks)) = t.pending.front_mut() else { unreachable!("checked above") };
                s.items.extend(toks.drain(..n).map(Item::Token));
                if toks.is_empty() {
                    t.pending.pop_front();
                }
                t.pos += n as i32;
                self.stats.prompt_positions_computed.fetch_add(n as u64, Ordering::Relaxed);
                if last {
                    let row = rows.next().expect("the prompt's last row");
                    self.start(i, row);
                }
            }
        }
        // A failure here is this request's alone.
        if let Some(i) = image_slot {
            if let Err(e) = self.image_chunk(i, n_ubatch) {
                self.end(i, End::Failed(format!("{e:#}")));
            }
        }
        if let Some(i) = encode_slot {
            if let Err(e) = self.encode(i) {
                self.end(i, End::Failed(format!("encoding an image: {e:#}")));
            }
        }
        Ok(())
    }

    /// Encodes the image at the front of slot `i`'s prompt (the vision tower, one image: seconds on a small CPU,
    /// during which no other request advances).
    fn encode(&mut self, i: usize) -> Result<()> {
        let t = self.slots[i].task.as_mut().expect("prefilling");
        let Some(Pending::Image { pixels, emb, n_tokens, hash, .. }) = t.pending.front_mut() else {
            unreachable!("checked")
        };
        let enc = self.encoder.as_mut().ok_or_else(|| anyhow!("no vision encoder"))?;
        let started = Instant::now();
        let e = enc.encode_pixels(pixels, 1)?.pop().ok_or_else(|| anyhow!("no embeddings"))?;
        if e.n_tokens != *n_tokens {
            bail!("{} image tokens where the vision model's parameters say {n_tokens}", e.n_tokens);
        }
        *pixels = Vec::new();
        self.images.put(hash, &e);
        *emb = Some(e);
        t.usage.images_encoded += 1;
        t.usage.image_encode_ms += started.elapsed().as_secs_f64() * 1e3;
        self.stats.encode_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The next rows of a slot's image embeddings, alone in a batch (a batch holds ids or embeddings).
    fn image_chunk(&mut self, i: usize, n_ubatch: usize) -> Result<()> {
        let n_embd = self.session.model.hp.n_embd;
        let s = &mut self.slots[i];
        let t = s.task.as_mut().expect("prefilling");
        let Some(Pending::Image { emb: Some(emb), hash, done, .. }) = t.pending.front_mut() else {
            unreachable!("checked")
        };
        if emb.n_tokens * n_embd != emb.data.len() {
            bail!(
                "image embeddings of width {} do not fit the language model's {n_embd}",
                emb.data.len() / emb.n_tokens.max(1)
            );
        }
        let n = (emb.n_tokens - *done).min(n_ubatch);
        let rows = &emb.data[*done * n_embd..(*done + n) * n_embd];
        let batch = Batch::sequence(Input::Embeddings(rows), n, t.pos, s.base, false);
        let started = Instant::now();
        let out = self.session.decode(&batch)?;
        self.stats.forward_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        record_step(&self.stats, 1, n);
        *done += n;
        t.pos += n as i32;
        self.stats.prompt_positions_computed.fetch_add(n as u64, Ordering::Relaxed);
        let image_done = *done == emb.n_tokens;
        if image_done {
            let hash = *hash;
            t.pending.pop_front();
            s.items.push(Item::Image(hash));
            if t.pending.is_empty() {
                // The prompt ends with an image (not Asagi's template, but a valid request).
                self.start(i, &out);
            }
        }
        Ok(())
    }

    /// The prompt is computed: set up the decoder and take its first step on the last row's logits.
    fn start(&mut self, i: usize, row: &[f32]) {
        let t = self.slots[i].task.as_mut().expect("task");
        t.first_token = Some(Instant::now());
        t.usage.prompt_ms = t.admitted.elapsed().as_secs_f64() * 1e3;
        match Decoder::new(&t.job.cfg, &t.job.prompt.ids) {
            Ok(d) => {
                t.decoder = Some(d);
                self.advance(i, &[row]);
            }
            Err(e) => self.end(i, End::Failed(format!("{e:#}"))),
        }
    }

    /// Hands a slot's logits rows to its decoder: streams what became final, relabels its beams, ends it when
    /// done or when a stop string appeared.
    fn advance(&mut self, i: usize, rows: &[&[f32]]) {
        let base = self.slots[i].base;
        let t = self.slots[i].task.as_mut().expect("task");
        let step = match t.decoder.as_mut().expect("generating").step(rows) {
            Ok(s) => s,
            Err(e) => return self.end(i, End::Failed(format!("{e:#}"))),
        };
        if let Err(e) = emit(t, &step.emit) {
            return self.end(i, End::Failed(format!("{e:#}")));
        }
        if let Some(from) = &step.reorder {
            self.session.cache.reorder_range(base, self.width, from);
        }
        if t.stop.stopped() || step.done || step.feed.is_empty() {
            return self.end(i, End::Natural);
        }
        t.feed = step.feed;
    }

    /// Ends slot `i`'s task: tells its client (unless it left), and leaves the slot's cache holding the
    /// conversation as far as it is reusable (the prompt, and a sampled answer's tokens).
    fn end(&mut self, i: usize, how: End) {
        let Some(mut t) = self.slots[i].task.take() else { return };
        self.stats.busy.fetch_sub(1, Ordering::Relaxed);
        let base = self.slots[i].base;
        let kv = &mut self.session.cache;
        kv.reorder_range(base, self.width, &[0]);
        let kept = prompt::positions(&self.slots[i].items, self.n_image_tokens);
        kv.seq_truncate(base, kept as i32);
        match how {
            End::Cancelled => {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            End::Failed(msg) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("engine: request failed: {}", msg.escape_debug());
                let _ = t.job.events.send(Event::Error(msg));
            }
            End::Natural => {
                let stopped_by_string = t.stop.stopped();
                let seqs = match t.decoder.take() {
                    Some(d) => {
                        let (seqs, rest) = d.finish(stopped_by_string);
                        if let Err(e) = emit(&mut t, &rest) {
                            let _ = t.job.events.send(Event::Error(format!("{e:#}")));
                            return;
                        }
                        seqs
                    }
                    None => Vec::new(),
                };
                // An answer cut inside a multi-byte character: its last bytes as the tokenizer decodes them.
                match t.text.flush() {
                    Ok(rest) if !rest.is_empty() => {
                        let out = t.stop.push(&rest);
                        t.released.push_str(&out);
                        if t.job.stream && !out.is_empty() {
                            let _ = t.job.events.send(Event::Delta(out));
                        }
                    }
                    _ => {}
                }
                let tail = t.stop.finish();
                if !tail.is_empty() {
                    t.released.push_str(&tail);
                    if t.job.stream {
                        let _ = t.job.events.send(Event::Delta(tail));
                    }
                }
                let finished = self.finished(&mut t, &seqs);
                self.stats.completed.fetch_add(1, Ordering::Relaxed);
                let _ = t.job.events.send(Event::Done(Box::new(finished)));
            }
        }
    }

    fn finished(&self, t: &mut Task<'_>, seqs: &[Generated]) -> Finished {
        let reason = |g: &Generated, hit: bool| if hit || g.eos.is_some() { "stop" } else { "length" };
        let mut choices = Vec::new();
        for (k, g) in seqs.iter().enumerate() {
            if k == 0 {
                // Exactly what was (or would have been) streamed.
                choices.push(Choice { text: t.released.clone(), finish_reason: reason(g, t.stop.stopped()) });
            } else {
                let full = self.tok.decode(&g.tokens, true).unwrap_or_default();
                let (text, hit) = truncate_at_stop(&full, &t.job.stops);
                choices.push(Choice { text: text.to_string(), finish_reason: reason(g, hit) });
            }
        }
        t.usage.completion_tokens = seqs.iter().map(|g| g.tokens.len()).sum();
        t.usage.predicted_ms = t.first_token.map_or(0.0, |f| f.elapsed().as_secs_f64() * 1e3);
        Finished { choices, usage: t.usage.clone() }
    }
}

fn record_step(stats: &Stats, requests: usize, rows: usize) {
    stats.steps.fetch_add(1, Ordering::Relaxed);
    if requests > 1 {
        stats.shared_steps.fetch_add(1, Ordering::Relaxed);
    }
    stats.max_requests_per_step.fetch_max(requests, Ordering::Relaxed);
    stats.max_rows_per_step.fetch_max(rows, Ordering::Relaxed);
}

/// Streams tokens of the first answer through the detokenizer and the stop strings.
fn emit(t: &mut Task<'_>, tokens: &[u32]) -> Result<()> {
    for &id in tokens {
        if t.stop.stopped() {
            break;
        }
        let piece = t.text.push(id).map_err(|e| anyhow!("detokenizing: {e:#}"))?;
        let out = t.stop.push(&piece);
        if !out.is_empty() {
            t.released.push_str(&out);
            if t.job.stream {
                let _ = t.job.events.send(Event::Delta(out));
            }
        }
    }
    Ok(())
}
