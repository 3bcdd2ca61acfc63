//! Running a planned merge: one thread reads each output tensor's inputs (or a chunk of them,
//! for the element-wise methods) into reused buffers while this one merges the previous batch
//! (a one-pass kernel where there is one, else [`merge_tensor`] on tensors over the buffers)
//! and a third appends it to the output file ([`Sink`]), whose header is written first from the
//! plan.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

use half::{bf16, f16};
use tch::{Kind, Tensor};

use super::config::MergeConfig;
use super::fused::{self, cast, cast_mut, Elem, Kernel, Run};
use super::methods::{merge_tensor, MergeMethod};
use super::output::{
    check_output_is_not_an_input, check_vocabularies, copy_other_files, is_weight_file,
};
use super::plan::{self, Plan, Planned};
use super::sink::Sink;
use super::stream::{dtype_of, finite_bytes, Buf};
use crate::{io, Error, Result};

/// What a streamed merge did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MergeStats {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes read from the inputs.
    pub bytes_read: u64,
    /// Bytes of tensor data written.
    pub bytes_written: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// Where a streamed merge is, after each tensor (for a progress bar).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Tensors written so far.
    pub done: usize,
    /// Tensors to write.
    pub total: usize,
    /// Bytes read from the inputs so far.
    pub bytes_read: u64,
    /// Seconds since the merge started.
    pub seconds: f64,
}

/// Runs a [`MergeConfig`] over model directories and writes `out/model.safetensors` with the
/// donor's (the base's, else the first source's) `config.json` and other non-weight files.
///
/// The config is planned as mergekit plans it: `models` become one slice of all layers with
/// the base added when not listed; each slice's layers follow the previous slices' (renumbered
/// in the tensor names, and `num_hidden_layers` rewritten in `config.json`); gradients run over
/// each slice's depth (`t = i / (n − 1)`, 1 for a one-layer slice); tensors outside the layers
/// use `t = 0` and come from the first slice's sources (embeddings) or the last's. A layer is
/// the first all-digit component of a tensor's module path. Integer tensors are copied from
/// the first source. With `tokenizer_source`, that model's tokenizer files are written, after
/// checking that every input has the same vocabulary files (so no embedding needs permuting).
///
/// Reading overlaps merging and writing: a second thread reads the next tensor's inputs (into
/// reused buffers, with no copy into libtorch) while this one merges the current one and a
/// third writes the previous one (`O_DIRECT` where the file system takes it;
/// `TCH_PEFT_MERGE_DIRECT_IO=0` writes through the page cache). Element-wise merges (linear,
/// task arithmetic, passthrough without `scale`, integer copies) go in chunks of 2²⁰ entries,
/// so their memory does not grow with the largest tensor. Every method but the general forms
/// (NuSLERP by rows or columns, filter-wise Model Stock, `exact_ties`, `exact_masks`, mixed
/// kinds) runs as one-pass kernels over the raw inputs (f32/f16/bf16); the rest through
/// [`merge_tensor`]. A non-finite value found in a chunk is reported for that chunk.
///
/// The output directory is replaced as a whole (a crash leaves the old one or the new one; see
/// [`crate::io`]); it may not be one of the inputs. Errors name the tensor and model when a
/// tensor is missing or shaped differently, and refuse a merged tensor that is not finite
/// ([`Error::NonFinite`]: the weights or the inputs are not sane) before anything is replaced.
pub fn merge_directories(cfg: &MergeConfig, out: impl AsRef<Path>) -> Result<MergeStats> {
    merge_directories_with_progress(cfg, out, |_| {})
}

/// [`merge_directories`], calling `progress` after each tensor is written.
pub fn merge_directories_with_progress(
    cfg: &MergeConfig,
    out: impl AsRef<Path>,
    mut progress: impl FnMut(&Progress),
) -> Result<MergeStats> {
    cfg.validate()?;
    let out = out.as_ref();
    check_output_is_not_an_input(cfg, out)?;
    if let Some(seed) = cfg.random_seed {
        tch::manual_seed(seed);
    }
    let started = Instant::now();
    let plan = plan::build(cfg)?;
    // the seed of DARE's counter-based draws: `random_seed`, else one draw of libtorch's
    // generator (with `random_seed` libtorch's sequence is left as mergekit's, for exact_masks)
    let seed = match cfg.random_seed {
        Some(s) => s as u64,
        None => Tensor::f_randint(i64::MAX, [1], (Kind::Int64, tch::Device::Cpu))?
            .f_int64_value(&[0])? as u64,
    };
    check_vocabularies(&plan)?;
    let header = header(&plan)?;
    let mut stats =
        MergeStats { tensors: plan.tensors.len(), bytes_read: 0, bytes_written: 0, seconds: 0.0 };
    // the weights of an earlier model in `out` (shards, their index, other formats) go
    io::replace_dir(out, &is_weight_file, |dir| {
        let path = dir.join("model.safetensors");
        let method = cfg.merge_method;
        let total = plan.tensors.len();
        // decided here, where `without_fused_kernels` is seen, for the reader too
        let chunked: Vec<bool> =
            plan.tensors.iter().map(|p| elementwise(method, &plan, p)).collect();
        let mut on_batch = |index: usize, elems: Range<usize>, bufs: &[Buf], out_buf: &mut Buf| {
            let p = &plan.tensors[index];
            stats.bytes_read += bufs.iter().map(|b| b.bytes().len() as u64).sum::<u64>();
            if copied(method, &plan, p) {
                // the first input's bytes, as they are
                out_buf.set_len(bufs[0].bytes().len());
                out_buf.bytes_mut().copy_from_slice(bufs[0].bytes());
                if p.float && !finite_bytes(p.out_kind, out_buf.bytes()) {
                    // named as the general path names it: the input when inputs are checked
                    let i = &p.inputs[0];
                    return Err(if io::require_finite() {
                        let file = plan.models[i.model].file_of(&i.name);
                        Error::NonFinite { name: i.name.clone(), file }
                    } else {
                        Error::NonFinite { name: p.name.clone(), file: out.to_path_buf() }
                    });
                }
            } else {
                merge_one(method, &plan, p, elems.clone(), bufs, out_buf, out, seed)?;
            }
            stats.bytes_written += out_buf.bytes().len() as u64;
            if elems.end == numel(p) {
                let seconds = started.elapsed().as_secs_f64();
                let bytes_read = stats.bytes_read;
                progress(&Progress { done: index + 1, total, bytes_read, seconds });
            }
            Ok(())
        };
        pipeline(&plan, &chunked, &mut on_batch, &path, &header)?;
        copy_other_files(cfg, &plan, dir)
    })?;
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

/// The safetensors header of the output, padded to 8 bytes, from the plan's shapes and kinds.
fn header(plan: &Plan) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut offset = 0u64;
    for p in &plan.tensors {
        let end = offset
            .checked_add(p.bytes)
            .ok_or_else(|| Error::config("models", "the merged model is too large"))?;
        let entry = serde_json::json!({
            "dtype": dtype_of(p.out_kind)?, "shape": p.shape, "data_offsets": [offset, end]
        });
        if header.insert(p.name.clone(), entry).is_some() {
            return Err(Error::config("slices", format!("`{}` would be written twice", p.name)));
        }
        offset = end;
    }
    let mut text = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    Ok(text)
}

/// Buffers not in use, shared by the threads that fill and drain them.
#[derive(Default)]
struct Pool(std::sync::Mutex<Vec<Buf>>);

impl Pool {
    /// The free buffer that fits `len` bytes most tightly, else the largest one (to grow), else
    /// a new one: big tensors (embeddings) keep big buffers and small ones small, so that the
    /// memory touched stays near what the tensors in flight need.
    fn take(&self, len: usize) -> Buf {
        let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let fit = (0..free.len())
            .filter(|&i| free[i].capacity() >= len)
            .min_by_key(|&i| free[i].capacity())
            .or_else(|| (0..free.len()).max_by_key(|&i| free[i].capacity()));
        fit.map(|i| free.swap_remove(i)).unwrap_or_default()
    }

    fn give(&self, b: Buf) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(b);
    }
}

/// What the merging thread does with entries `elems` of one tensor: their inputs' bytes in,
/// the output's out.
type OnBatch<'a> = dyn FnMut(usize, Range<usize>, &[Buf], &mut Buf) -> Result<()> + 'a;

/// A read batch: the tensor's index, its entries, and their bytes per input.
type Batch = (usize, Range<usize>, Vec<Buf>);

/// Entries per batch of a tensor merged entry by entry (4 MiB of f32 per input).
const CHUNK_ELEMS: usize = 1 << 20;

/// The number of entries of a planned tensor.
fn numel(p: &Planned) -> usize {
    p.shape.iter().product::<i64>() as usize
}

/// Whether a tensor's output is its first input's bytes: integers, and passthrough without
/// `scale` where the input, work and output kinds are one (then `t.to(work).to(out)` is `t`).
fn copied(method: MergeMethod, plan: &Plan, p: &Planned) -> bool {
    let Some(first) = p.inputs.first() else { return false };
    !p.float
        || (method == MergeMethod::Passthrough
            && first.params.scale.is_none()
            && p.work_kind == p.out_kind
            && plan.models[first.model].info(&first.name).is_some_and(|(_, k)| k == p.out_kind))
}

/// Whether a tensor is merged entry by entry, so that it can be read, merged and written in
/// chunks: copies ([`copied`]), and the element-wise kernels (linear, task arithmetic) on
/// inputs of one kind. The others need whole tensors (a Gram matrix, a magnitude ranking, a
/// norm).
fn elementwise(method: MergeMethod, plan: &Plan, p: &Planned) -> bool {
    copied(method, plan, p)
        || matches!(
            choose_kernel(method, plan, p).0,
            Some(Kernel::Linear { .. } | Kernel::TaskArithmetic)
        )
}

/// The one-pass kernel for a tensor (none: the general path), with its inputs' kinds: the one
/// decision [`elementwise`] and [`merge_one`] share.
fn choose_kernel(method: MergeMethod, plan: &Plan, p: &Planned) -> (Option<Kernel>, Vec<Kind>) {
    let kinds: Vec<Kind> = p
        .inputs
        .iter()
        .map(|i| plan.models[i.model].info(&i.name).map_or(Kind::Float, |(_, k)| k))
        .collect();
    let params: Vec<_> = p.inputs.iter().filter(|i| !i.is_base).map(|i| i.params).collect();
    let same = kinds.iter().all(|&k| k == p.work_kind) && della_fusable(method, p, &params);
    let kernel =
        if same { fused::kernel(method, &p.global, &params, &kinds, p.out_kind) } else { None };
    (kernel, kinds)
}

/// Runs the merge on three threads: a reader fills each planned tensor's input buffers (a
/// chunk at a time where `chunked`), one batch ahead; this thread merges (`on_batch`) into an
/// output buffer; a writer appends it to the file at `path` after the `header` ([`Sink`]:
/// direct writes where the file system allows). Buffers cycle back to the reader and this
/// thread, so at most two batches' inputs and two outputs are held. Stops at the first error
/// of any of them.
fn pipeline(
    plan: &Plan,
    chunked: &[bool],
    on_batch: &mut OnBatch<'_>,
    path: &Path,
    header: &[u8],
) -> Result<()> {
    let file = Sink::create(path)?;
    // buffers go back to pools, each taken again for the tensor it fits best
    let pools = (Pool::default(), Pool::default());
    let (in_pool, out_pool) = (&pools.0, &pools.1);
    let (in_tx, in_rx) = mpsc::sync_channel::<Result<Batch>>(0);
    let (out_tx, out_rx) = mpsc::sync_channel::<Buf>(0);
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut handles: Vec<HashMap<usize, File>> =
                plan.models.iter().map(|_| HashMap::new()).collect();
            for (index, p) in plan.tensors.iter().enumerate() {
                let n = if p.float { p.inputs.len() } else { 1 };
                let total = numel(p);
                let step = if chunked[index] { CHUNK_ELEMS } else { total.max(1) };
                // one batch at least (a tensor of no entries too)
                for start in (0..total.max(1)).step_by(step) {
                    let elems = start.min(total)..(start + step).min(total);
                    let mut bufs = Vec::with_capacity(n);
                    for i in &p.inputs[..n] {
                        let model = &plan.models[i.model];
                        let size = model.info(&i.name).map_or(1, |(_, k)| k.elt_size_in_bytes());
                        let range = (elems.start * size) as u64..(elems.end * size) as u64;
                        let mut b = in_pool.take((range.end - range.start) as usize);
                        if let Err(e) =
                            model.read_raw(&i.name, range, &mut handles[i.model], &mut b)
                        {
                            let _ = in_tx.send(Err(e));
                            return;
                        }
                        bufs.push(b);
                    }
                    if in_tx.send(Ok((index, elems, bufs))).is_err() {
                        return; // the merging side stopped
                    }
                }
            }
        });
        let writer = s.spawn(move || -> Result<()> {
            let mut w = file;
            w.write_all(&(header.len() as u64).to_le_bytes())?;
            w.write_all(header)?;
            for buf in out_rx {
                w.write_all(buf.bytes())?;
                out_pool.give(buf);
            }
            w.finish().map(drop)
        });
        // the channels' ends are moved in and dropped on return, so that a reader blocked on
        // a send wakes (its send fails) and the writer sees the end, before the scope joins
        let mut consume = move |in_rx: mpsc::Receiver<Result<Batch>>,
                                out_tx: mpsc::SyncSender<Buf>|
              -> Result<()> {
            for batch in in_rx {
                let (index, elems, bufs) = batch?;
                let p = &plan.tensors[index];
                let mut out_buf = out_pool.take(elems.len() * p.out_kind.elt_size_in_bytes());
                on_batch(index, elems, &bufs, &mut out_buf)?;
                for b in bufs {
                    in_pool.give(b);
                }
                if out_tx.send(out_buf).is_err() {
                    break; // the writer failed: its error is the one to report
                }
            }
            Ok(())
        };
        let merged = consume(in_rx, out_tx);
        let written = writer.join().unwrap_or_else(|_| {
            Err(Error::io(path, std::io::Error::other("the writer thread panicked")))
        });
        merged.and(written)
    })
}

/// Merges entries `elems` of one floating-point tensor (all of them unless it is
/// [`elementwise`]) from their inputs' bytes into `out_buf`.
#[allow(clippy::too_many_arguments)]
fn merge_one(
    method: MergeMethod,
    plan: &Plan,
    p: &Planned,
    elems: Range<usize>,
    bufs: &[Buf],
    out_buf: &mut Buf,
    out: &Path,
    seed: u64,
) -> Result<()> {
    let whole = elems.len() == numel(p);
    out_buf.set_len(elems.len() * p.out_kind.elt_size_in_bytes());
    let (kernel, kinds) = choose_kernel(method, plan, p);
    if !whole && !matches!(kernel, Some(Kernel::Linear { .. } | Kernel::TaskArithmetic)) {
        // chunks are made only for the element-wise kernels (`elementwise`, the same test)
        return Err(Error::io(out, std::io::Error::other("a chunk reached a whole-tensor path")));
    }
    if let Some(k) = kernel {
        let (in_ok, out_ok) = match (p.work_kind, p.out_kind) {
            (Kind::Float, o) => fused_typed::<f32>(k, method, p, bufs, out_buf, o, seed),
            (Kind::BFloat16, o) => fused_typed::<bf16>(k, method, p, bufs, out_buf, o, seed),
            (Kind::Half, o) => fused_typed::<f16>(k, method, p, bufs, out_buf, o, seed),
            _ => unreachable!("fused kernels take f32, f16, bf16"),
        }?;
        if !in_ok && io::require_finite() {
            return Err(first_non_finite(plan, p, bufs));
        }
        if !out_ok {
            return Err(Error::NonFinite { name: p.name.clone(), file: out.to_path_buf() });
        }
        return Ok(());
    }
    // the general path: tensors over the buffers (no copy), then merge_tensor
    let mut base = None;
    let mut inputs = Vec::with_capacity(p.inputs.len());
    for ((i, b), &k) in p.inputs.iter().zip(bufs).zip(&kinds) {
        if io::require_finite() && !finite_bytes(k, b.bytes()) {
            let file = plan.models[i.model].file_of(&i.name);
            return Err(Error::NonFinite { name: i.name.clone(), file });
        }
        let t = blob(b, &p.shape, k)?;
        let t = if k == p.work_kind { t } else { t.f_to_kind(p.work_kind)? };
        if i.is_base {
            base = Some(t);
        } else {
            inputs.push((t, i.params));
        }
    }
    let pairs: Vec<(&Tensor, _)> = inputs.iter().map(|(t, p)| (t, *p)).collect();
    let merged = tch::no_grad(|| merge_tensor(method, base.as_ref(), &pairs, &p.global))?;
    let merged = merged.f_to_kind(p.out_kind)?.f_contiguous()?;
    merged.f_copy_data_u8(out_buf.bytes_mut(), merged.numel())?;
    if !finite_bytes(p.out_kind, out_buf.bytes()) {
        return Err(Error::NonFinite { name: p.name.clone(), file: out.to_path_buf() });
    }
    Ok(())
}

/// The entries of a row DELLA ranks within (mergekit ranks along dim 1; a vector is one row).
fn della_row_len(shape: &[i64]) -> i64 {
    if shape.len() < 2 {
        shape.iter().product()
    } else {
        shape[1]
    }
}

/// Whether DELLA's one-pass path applies: at most two dimensions with rows of at least two
/// entries, and settings the general path would not refuse (it names the error).
fn della_fusable(method: MergeMethod, p: &Planned, params: &[crate::merge::ModelParams]) -> bool {
    if !matches!(method, MergeMethod::Della | MergeMethod::DellaLinear) {
        return true;
    }
    let cols = della_row_len(&p.shape);
    p.shape.len() <= 2
        && cols >= 2
        && params.iter().all(|m| {
            m.density >= 1.0
                || (m.density > 0.0 && m.density + m.epsilon < 1.0 && m.density - m.epsilon > 0.0)
        })
}

/// A CPU tensor over `b`'s bytes (no copy; dropped before `b` is reused).
fn blob(b: &Buf, shape: &[i64], kind: Kind) -> Result<Tensor> {
    let mut strides = vec![1i64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1].max(1);
    }
    // SAFETY: `b` holds the tensor's bytes (its length is the shape's byte size, checked with
    // the header), is aligned to 8 bytes, outlives the tensor, and is not written meanwhile
    Ok(unsafe { Tensor::f_from_blob(b.bytes().as_ptr(), shape, &strides, kind, tch::Device::Cpu)? })
}

/// The first input of `p` holding a non-finite value, as the loaders' error.
fn first_non_finite(plan: &Plan, p: &Planned, bufs: &[Buf]) -> Error {
    for (i, b) in p.inputs.iter().zip(bufs) {
        let kind = plan.models[i.model].info(&i.name).map_or(Kind::Float, |(_, k)| k);
        if !finite_bytes(kind, b.bytes()) {
            return Error::NonFinite {
                name: i.name.clone(),
                file: plan.models[i.model].file_of(&i.name),
            };
        }
    }
    Error::NonFinite {
        name: p.name.clone(),
        file: plan.models[p.inputs[0].model].dir().to_path_buf(),
    }
}

fn fused_typed<I: Elem>(
    k: Kernel,
    method: MergeMethod,
    p: &Planned,
    bufs: &[Buf],
    out: &mut Buf,
    out_kind: Kind,
    seed: u64,
) -> Result<(bool, bool)> {
    match out_kind {
        Kind::Float => fused_run::<I, f32>(k, method, p, bufs, out, seed),
        Kind::BFloat16 => fused_run::<I, bf16>(k, method, p, bufs, out, seed),
        _ => fused_run::<I, f16>(k, method, p, bufs, out, seed),
    }
}

fn fused_run<I: Elem, O: Elem>(
    k: Kernel,
    method: MergeMethod,
    p: &Planned,
    bufs: &[Buf],
    out: &mut Buf,
    seed: u64,
) -> Result<(bool, bool)> {
    // SAFETY: the buffers are 8-byte aligned and hold the tensors' bytes; every bit pattern
    // is a valid f32, f16 or bf16
    let views: Vec<&[I]> = bufs.iter().map(|b| unsafe { cast::<I>(b.bytes()) }).collect();
    let base = p.inputs.iter().position(|i| i.is_base).map(|b| views[b]);
    let mut inputs = Vec::new();
    let mut weights = Vec::new();
    let mut keep = Vec::new();
    for (i, v) in p.inputs.iter().zip(&views) {
        if i.is_base {
            continue;
        }
        inputs.push(*v);
        weights.push(i.params.weight as f32);
        if let (Kernel::Magnitude { .. }, Some(b)) = (k, base) {
            keep.push(match fused::rank_range(method, &i.params, v.len()) {
                None => (0, u32::MAX),
                Some((lo, hi)) if lo > hi => (1, 0),
                Some((lo, _)) if method == MergeMethod::Ties => {
                    (fused::select_ranks(v, b, &[lo])[0], u32::MAX)
                }
                Some((lo, hi)) => {
                    let r = fused::select_ranks(v, b, &[lo, hi]);
                    (r[0], r[1])
                }
            });
        }
    }
    let coef: Vec<f32> = match k {
        Kernel::TaskArithmetic => {
            let g = &p.global;
            let total: f64 = p.inputs.iter().filter(|i| !i.is_base).map(|i| i.params.weight).sum();
            let normalize = g.normalize.unwrap_or(method.default_normalize());
            let div = if normalize && total.abs() >= 1e-8 { total } else { 1.0 };
            p.inputs
                .iter()
                .filter(|i| !i.is_base)
                .map(|i| (g.lambda * i.params.weight / div) as f32)
                .collect()
        }
        _ => weights.clone(),
    };
    let (k, coef, base) = match k {
        Kernel::Spherical => {
            let params: Vec<_> = p.inputs.iter().filter(|i| !i.is_base).map(|i| i.params).collect();
            if method == MergeMethod::Slerp {
                // the base and the model as they are (v0, v1), not as task vectors
                let b = base.expect("SLERP has a base");
                let g = fused::gram::<I>(None, &[b, inputs[0]]);
                let (_, c) =
                    fused::spherical_coefficients(method, &p.global, &[params[0]; 2], &g, false)?;
                (Kernel::Combine { base_coef: c[0] as f32 }, vec![c[1] as f32], base)
            } else {
                let g = fused::gram(base, &inputs);
                let (c0, c) =
                    fused::spherical_coefficients(method, &p.global, &params, &g, base.is_some())?;
                let coef = c.iter().map(|&x| x as f32).collect();
                (Kernel::Combine { base_coef: c0 as f32 }, coef, base)
            }
        }
        other => (other, coef, base),
    };
    let (mut random, mut scale, mut masks) = (Vec::new(), Vec::new(), Vec::new());
    let della = matches!(method, MergeMethod::Della | MergeMethod::DellaLinear);
    if let (Kernel::Random { .. }, Some(b), true) = (k, base, della) {
        let g = &p.global;
        let rescale = g.rescale.unwrap_or(method.default_rescale());
        let cols = della_row_len(&p.shape);
        for (n, i) in p.inputs.iter().filter(|i| !i.is_base).enumerate() {
            let (density, eps) = (i.params.density, i.params.epsilon);
            random.push((0, 0));
            if density >= 1.0 {
                masks.push(vec![u64::MAX; inputs[n].len().div_ceil(64)]);
                scale.push(1.0);
                continue;
            }
            let key = fused::draw_key(seed, &p.name, n);
            let (bits, factor) =
                fused::della_bits(inputs[n], b, cols.max(1) as usize, density, eps, key);
            masks.push(bits);
            scale.push(if rescale { factor } else { 1.0 });
        }
    } else if let (Kernel::Random { .. }, Some(b)) = (k, base) {
        let g = &p.global;
        let rescale = g.rescale.unwrap_or(method.default_rescale());
        for (n, i) in p.inputs.iter().filter(|i| !i.is_base).enumerate() {
            let key = fused::draw_key(seed, &p.name, n);
            let density = i.params.density;
            if density < 0.0 {
                // libtorch's Bernoulli (the general path, mergekit) refuses it too
                return Err(Error::config("density", format!("{density} is not a probability")));
            }
            let thr = fused::keep_threshold(density);
            random.push((key, thr));
            if rescale && !g.inverse_density {
                // the L1 rescale needs the mask first: drawn once, kept as bits for the merge
                let (bits, factor) = if density >= 1.0 {
                    (vec![u64::MAX; inputs[n].len().div_ceil(64)], 1.0)
                } else {
                    fused::dare_bits(inputs[n], b, key, thr)
                };
                masks.push(bits);
                scale.push(factor);
            } else {
                scale.push(if density >= 1.0 || !rescale { 1.0 } else { (1.0 / density) as f32 });
            }
        }
    }
    // SAFETY: as above, for the output buffer of the planned size
    let out = unsafe { cast_mut::<O>(out.bytes_mut()) };
    if let Kernel::Sce { select_topk } = k {
        return Ok(fused::sce(base.expect("SCE has a base"), &inputs, out, select_topk));
    }
    Ok(Run { base, inputs, coef, weights, keep, random, scale, masks, out }.go(k))
}
