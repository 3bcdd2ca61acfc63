//! Reading `torch.save` files that hold a dict of tensors (pyvene's `intkey_*.bin`).
//!
//! A `torch.save` file (PyTorch ≥ 1.6) is a zip archive: `<name>/data.pkl` (a pickle of the
//! object, tensors referring to storages through persistent ids) and `<name>/data/<key>` (each
//! storage's raw little-endian bytes). This module runs a small pickle machine that knows the
//! opcodes and globals a state dict uses (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`, typed storages) and
//! nothing else: no code from the file is ever executed, and anything outside that set is an
//! error naming it. (libtorch's own unpickler does not accept `OrderedDict` state dicts.)
//!
//! The file is hostile until checked. Containers live in one arena and the stack and memo hold
//! indices into it, so a memo entry fetched a million times is one object (as in Python), not a
//! million copies, and nothing is cloned or dropped recursively; nesting deeper than
//! [`MAX_PICKLE_DEPTH`], more than [`MAX_PICKLE_OBJECTS`] objects, a pickle over
//! [`MAX_PICKLE_BYTES`](super::MAX_PICKLE_BYTES) or compressed archive entries are refused.
//! Tensors are views of their storage, as `torch.load` gives them: keys sharing a storage share
//! it in memory too, so what is built never exceeds the archive's size. A view must lie inside
//! its storage and have no more elements than it (stride-0 expansions are refused).

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;
use std::rc::Rc;

use tch::{Kind, Tensor};

use crate::{Error, Result};

/// The deepest nesting of tuples, lists and dicts accepted (a state dict needs 4).
pub const MAX_PICKLE_DEPTH: usize = 64;

/// The largest tensor rank accepted.
const MAX_TENSOR_RANK: usize = 64;

/// The most values a pickle may push (a state dict needs about twenty per tensor).
pub const MAX_PICKLE_OBJECTS: usize = 1 << 23;

/// What the stack and the memo hold: scalars by value, strings shared, containers by index.
#[derive(Debug, Clone)]
enum Value {
    /// `None`, booleans and floats: read, never used.
    Scalar,
    Int(i64),
    Str(Rc<str>),
    Global(Rc<str>),
    /// An object in the arena.
    Obj(usize),
    Mark,
}

#[derive(Debug)]
enum Node {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Storage { kind: Kind, key: Rc<str> },
    Tensor { storage: usize, offset: i64, size: Vec<i64>, stride: Vec<i64> },
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "torch.FloatStorage" => Kind::Float,
        "torch.DoubleStorage" => Kind::Double,
        "torch.HalfStorage" => Kind::Half,
        "torch.BFloat16Storage" => Kind::BFloat16,
        "torch.LongStorage" => Kind::Int64,
        "torch.IntStorage" => Kind::Int,
        "torch.ShortStorage" => Kind::Int16,
        "torch.CharStorage" => Kind::Int8,
        "torch.ByteStorage" => Kind::Uint8,
        "torch.BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

type Step<T> = std::result::Result<T, String>;

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    nodes: Vec<Node>,
    /// Nesting depth of each node (1 for a container of scalars).
    depth: Vec<usize>,
    pushed: usize,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Machine {
            data,
            pos: 0,
            stack: Vec::new(),
            memo: HashMap::new(),
            nodes: Vec::new(),
            depth: Vec::new(),
            pushed: 0,
        }
    }

    fn take(&mut self, n: usize) -> Step<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or("the pickle ends early")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Step<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Step<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Step<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> Step<String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&c| c == b'\n').ok_or("an unterminated line")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn push(&mut self, v: Value) -> Step<()> {
        self.pushed += 1;
        if self.pushed > MAX_PICKLE_OBJECTS {
            return Err(format!("more than {MAX_PICKLE_OBJECTS} values"));
        }
        self.stack.push(v);
        Ok(())
    }

    fn depth_of(&self, v: &Value) -> usize {
        match v {
            Value::Obj(i) => self.depth[*i],
            _ => 0,
        }
    }

    /// A new node nested `depth` deep.
    fn alloc(&mut self, node: Node, depth: usize) -> Step<Value> {
        if depth > MAX_PICKLE_DEPTH {
            return Err(format!("nesting deeper than {MAX_PICKLE_DEPTH}"));
        }
        self.nodes.push(node);
        self.depth.push(depth);
        Ok(Value::Obj(self.nodes.len() - 1))
    }

    /// Records that node `i` now also holds `children` (APPEND, SETITEM).
    fn deepen(&mut self, i: usize, children: &[Value]) -> Step<()> {
        let d = 1 + children.iter().map(|v| self.depth_of(v)).max().unwrap_or(0);
        if d > MAX_PICKLE_DEPTH {
            return Err(format!("nesting deeper than {MAX_PICKLE_DEPTH}"));
        }
        self.depth[i] = self.depth[i].max(d);
        Ok(())
    }

    fn pop(&mut self) -> Step<Value> {
        self.stack.pop().ok_or_else(|| "the pickle stack underflows".to_string())
    }

    fn pop_mark(&mut self) -> Step<Vec<Value>> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("no MARK on the pickle stack")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn string(&mut self, n: usize) -> Step<Value> {
        Ok(Value::Str(String::from_utf8_lossy(self.take(n)?).into()))
    }

    fn tuple(&mut self, items: Vec<Value>) -> Step<Value> {
        let d = 1 + items.iter().map(|v| self.depth_of(v)).max().unwrap_or(0);
        self.alloc(Node::Tuple(items), d)
    }

    fn ints(&self, v: Option<&Value>, what: &str) -> Step<Vec<i64>> {
        let Some(Value::Obj(i)) = v else {
            return Err(format!("_rebuild_tensor_v2 without a {what} tuple"));
        };
        match &self.nodes[*i] {
            Node::Tuple(t) | Node::List(t) => t
                .iter()
                .map(|x| match x {
                    Value::Int(i) => Ok(*i),
                    _ => Err(format!("a non-integer {what}")),
                })
                .collect(),
            _ => Err(format!("a {what} that is not a tuple")),
        }
    }

    fn reduce(&mut self, f: Value, args: Value) -> Step<Value> {
        let Value::Global(name) = f else { return Err("REDUCE of a non-global".into()) };
        let Value::Obj(a) = args else { return Err("REDUCE without an argument tuple".into()) };
        let Node::Tuple(args) = &self.nodes[a] else {
            return Err("REDUCE without an argument tuple".into());
        };
        if &*name == "collections.OrderedDict" {
            return self.alloc(Node::Dict(Vec::new()), 1);
        }
        // a tensor's arguments are a handful: never copy a long tuple
        if args.len() > 8 {
            return Err(format!("`{name}` with {} arguments", args.len()));
        }
        let args = args.clone();
        match &*name {
            "torch._utils._rebuild_tensor_v2" => {
                let storage = match args.first() {
                    Some(Value::Obj(s)) if matches!(self.nodes[*s], Node::Storage { .. }) => *s,
                    _ => return Err("_rebuild_tensor_v2 without a storage".into()),
                };
                let Some(Value::Int(offset)) = args.get(1) else {
                    return Err("_rebuild_tensor_v2 without an offset".into());
                };
                let size = self.ints(args.get(2), "size")?;
                let stride = self.ints(args.get(3), "stride")?;
                if size.len() > MAX_TENSOR_RANK {
                    return Err(format!(
                        "a tensor of rank {} (at most {MAX_TENSOR_RANK})",
                        size.len()
                    ));
                }
                if size.len() != stride.len() {
                    return Err(
                        "_rebuild_tensor_v2 with sizes and strides of different ranks".into()
                    );
                }
                self.alloc(Node::Tensor { storage, offset: *offset, size, stride }, 1)
            }
            "torch._utils._rebuild_parameter" => {
                args.into_iter().next().ok_or_else(|| "_rebuild_parameter without data".into())
            }
            other => Err(format!("`{other}` is not allowed in a state dict")),
        }
    }

    fn memo_put(&mut self, i: u32) -> Step<()> {
        let top = self.stack.last().ok_or("BINPUT on an empty stack")?.clone();
        self.memo.insert(i, top);
        Ok(())
    }

    fn run(&mut self) -> Step<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(format!("{module}.{name}").into()))?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.push(Value::Global(format!("{m}.{n}").into()))?
                        }
                        _ => return Err("STACK_GLOBAL of non-strings".into()),
                    }
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = u32::try_from(self.memo.len()).map_err(|_| "too many memo entries")?;
                    self.memo_put(i)?;
                }
                b'h' | b'j' => {
                    let i = if op == b'h' { self.u8()? as u32 } else { self.u32()? };
                    let v = self.memo.get(&i).ok_or("BINGET of an unknown memo entry")?.clone();
                    self.push(v)?;
                }
                b'(' => self.push(Value::Mark)?,
                b')' => {
                    let t = self.tuple(Vec::new())?;
                    self.push(t)?;
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let t = self.tuple(items)?;
                    self.push(t)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("TUPLEn on a short stack".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let t = self.tuple(items)?;
                    self.push(t)?;
                }
                b'}' => {
                    let d = self.alloc(Node::Dict(Vec::new()), 1)?;
                    self.push(d)?;
                }
                b']' => {
                    let l = self.alloc(Node::List(Vec::new()), 1)?;
                    self.push(l)?;
                }
                b'a' | b'e' => {
                    let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                    let Some(Value::Obj(i)) = self.stack.last() else {
                        return Err("APPEND to a non-list".into());
                    };
                    let i = *i;
                    self.deepen(i, &items)?;
                    match &mut self.nodes[i] {
                        Node::List(l) => l.extend(items),
                        _ => return Err("APPEND to a non-list".into()),
                    }
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = self.pop()?;
                        let k = self.pop()?;
                        vec![k, v]
                    } else {
                        self.pop_mark()?
                    };
                    let Some(Value::Obj(i)) = self.stack.last() else {
                        return Err("SETITEM on a non-dict".into());
                    };
                    let i = *i;
                    self.deepen(i, &items)?;
                    let Node::Dict(d) = &mut self.nodes[i] else {
                        return Err("SETITEM on a non-dict".into());
                    };
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v as i64))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?;
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64))?;
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err("an integer wider than 64 bits".into());
                    }
                    let mut buf =
                        if b.last().is_some_and(|&x| x & 0x80 != 0) { [0xff; 8] } else { [0; 8] };
                    buf[..n].copy_from_slice(b);
                    self.push(Value::Int(i64::from_le_bytes(buf)))?;
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Value::Scalar)?;
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push(s)?;
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.push(s)?;
                }
                0x88 | 0x89 | b'N' => self.push(Value::Scalar)?,
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.reduce(f, args)?;
                    self.push(v)?;
                }
                b'b' => {
                    // BUILD: state set on an object (an OrderedDict's `_metadata`): not needed
                    self.pop()?;
                    if self.stack.is_empty() {
                        return Err("BUILD on an empty stack".into());
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let Value::Obj(t) = pid else {
                        return Err("a persistent id that is not a tuple".into());
                    };
                    let Node::Tuple(t) = &self.nodes[t] else {
                        return Err("a persistent id that is not a tuple".into());
                    };
                    let storage = match (t.first(), t.get(1), t.get(2)) {
                        (Some(Value::Str(tag)), Some(Value::Global(ty)), Some(Value::Str(key)))
                            if &**tag == "storage" =>
                        {
                            let kind =
                                storage_kind(ty).ok_or_else(|| format!("storage type `{ty}`"))?;
                            Node::Storage { kind, key: key.clone() }
                        }
                        _ => return Err("a persistent id that is not a storage".into()),
                    };
                    let s = self.alloc(storage, 1)?;
                    self.push(s)?;
                }
                b'.' => return self.pop(),
                other => return Err(format!("pickle opcode 0x{other:02x} is not supported")),
            }
        }
    }
}

/// The `(name, tensor)` entries of a dict saved with `torch.save` (zip format, PyTorch ≥ 1.6),
/// in the file's order; entries whose value is not a tensor are skipped. Errors name the file
/// and what is wrong (not a regular file, not a zip, no `data.pkl`, an unsupported pickle
/// construct, a limit exceeded, a storage that is missing or too short).
///
/// The file is hostile until checked: memo entries are shared, not copied; nesting deeper than
/// [`MAX_PICKLE_DEPTH`](crate::io::MAX_PICKLE_DEPTH), more than
/// [`MAX_PICKLE_OBJECTS`](crate::io::MAX_PICKLE_OBJECTS) values, a pickle over
/// [`MAX_PICKLE_BYTES`](crate::io::MAX_PICKLE_BYTES) and compressed entries are refused. Tensors
/// are views of their storages (shared by key, as `torch.load` gives them), each inside its
/// storage and no larger than it, so what is built never exceeds the archive.
pub fn read_torch_dict(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    let path = path.as_ref();
    let (file, len) = super::files::open_regular(path)?;
    let tensors = read_archive(file, len, path)?;
    super::check_loaded_finite(tensors.iter().map(|(n, t)| (n.as_str(), t)), path)?;
    Ok(tensors)
}

/// As [`read_torch_dict`], from the bytes of the archive (`what` names it in errors).
pub fn read_torch_dict_bytes(bytes: &[u8], what: &str) -> Result<Vec<(String, Tensor)>> {
    read_archive(std::io::Cursor::new(bytes), bytes.len() as u64, Path::new(what))
}

/// `len`: the archive's size, which the storages together may not exceed (zip entries can
/// overlap: one region listed many times is refused, not read many times).
fn read_archive<R: Read + Seek>(reader: R, len: u64, path: &Path) -> Result<Vec<(String, Tensor)>> {
    let corrupt = |reason: String| Error::CorruptFile { file: path.to_path_buf(), reason };
    let mut zip =
        zip::ZipArchive::new(reader).map_err(|e| corrupt(format!("not a torch.save zip: {e}")))?;
    let pkl_name = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(str::to_string))
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or_else(|| corrupt("no data.pkl in the archive".into()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let read = |zip: &mut zip::ZipArchive<R>, name: &str, max: u64| -> Result<Vec<u8>> {
        let entry = zip.by_name(name).map_err(|e| corrupt(format!("`{name}`: {e}")))?;
        // torch.save stores entries uncompressed: a stored entry is no larger than the file
        if entry.compression() != zip::CompressionMethod::Stored {
            return Err(corrupt(format!("`{name}` is compressed (torch.save stores entries)")));
        }
        let size = entry.size();
        if size > max {
            return Err(corrupt(format!("`{name}` holds {size} bytes, more than {max}")));
        }
        let mut buf = Vec::new();
        entry.take(size).read_to_end(&mut buf).map_err(|e| Error::io(path, e))?;
        if buf.len() as u64 != size {
            return Err(corrupt(format!("`{name}` is shorter than its header says")));
        }
        Ok(buf)
    };
    if let Ok(order) = read(&mut zip, &format!("{prefix}byteorder"), 16) {
        if order != b"little" {
            return Err(corrupt("big-endian storages are not supported".into()));
        }
    }
    let pkl = read(&mut zip, &pkl_name, super::MAX_PICKLE_BYTES)?;
    let mut m = Machine::new(&pkl);
    let value = m.run().map_err(corrupt)?;
    let entries = match value {
        Value::Obj(i) => match &m.nodes[i] {
            Node::Dict(d) => d.clone(),
            _ => return Err(corrupt("the file does not hold a dict".into())),
        },
        _ => return Err(corrupt("the file does not hold a dict".into())),
    };
    // by key: every persistent id naming a storage is the same storage
    let mut storages: HashMap<Rc<str>, Tensor> = HashMap::new();
    let mut storage_bytes = 0u64;
    let mut out = Vec::new();
    for (k, v) in entries {
        let (Value::Str(name), Value::Obj(t)) = (k, v) else { continue };
        let Node::Tensor { storage, offset, size, stride } = &m.nodes[t] else { continue };
        let Node::Storage { kind, key } = &m.nodes[*storage] else { continue };
        let (kind, elem) = (*kind, kind.elt_size_in_bytes() as i64);
        let base = match storages.get(key) {
            Some(b) if b.kind() == kind => b.shallow_clone(),
            Some(b) => {
                return Err(corrupt(format!(
                    "storage `{key}` is read as {kind:?} and as {:?}",
                    b.kind()
                )))
            }
            None => {
                let room = len.saturating_sub(storage_bytes);
                let bytes = read(&mut zip, &format!("{prefix}data/{key}"), room)?;
                storage_bytes += bytes.len() as u64;
                let numel = bytes.len() as i64 / elem;
                let b =
                    Tensor::f_from_data_size(&bytes[..(numel * elem) as usize], &[numel], kind)?;
                storages.insert(key.clone(), b.shallow_clone());
                b
            }
        };
        let available = base.numel() as i64;
        let fits = view_extent(size, stride, *offset)
            .is_some_and(|(numel, needed)| needed <= available && numel <= available);
        if !fits {
            return Err(corrupt(format!(
                "tensor `{name}` (size {size:?}, stride {stride:?}, offset {offset}) does not lie \
                 inside its storage of {available} elements"
            )));
        }
        out.push((name.to_string(), base.f_as_strided(size, stride, Some(*offset))?));
    }
    Ok(out)
}

/// `(elements, storage elements needed)` of a strided view, or `None` when a size, stride or
/// offset is negative or the arithmetic overflows.
fn view_extent(size: &[i64], stride: &[i64], offset: i64) -> Option<(i64, i64)> {
    if offset < 0 || size.iter().chain(stride).any(|&x| x < 0) {
        return None;
    }
    let numel = size.iter().try_fold(1i64, |a, &s| a.checked_mul(s))?;
    if numel == 0 {
        return Some((0, offset));
    }
    let last = size
        .iter()
        .zip(stride)
        .try_fold(0i64, |a, (&s, &st)| a.checked_add((s - 1).checked_mul(st)?))?;
    Some((numel, offset.checked_add(last)?.checked_add(1)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_extents_are_checked() {
        assert_eq!(view_extent(&[2, 3], &[3, 1], 0), Some((6, 6)));
        assert_eq!(view_extent(&[2, 3], &[1, 2], 4), Some((6, 10)));
        assert_eq!(view_extent(&[0, 3], &[3, 1], 7), Some((0, 7)));
        assert_eq!(view_extent(&[-1], &[1], 0), None);
        assert_eq!(view_extent(&[2], &[1], -1), None);
        assert_eq!(view_extent(&[i64::MAX, 3], &[1, 1], 0), None);
        assert_eq!(view_extent(&[2], &[i64::MAX], 0), None);
    }
}
