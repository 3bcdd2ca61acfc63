//! Reading `torch.save` files that hold a dict of tensors (pyvene's `intkey_*.bin`).
//!
//! A `torch.save` file (PyTorch ≥ 1.6) is a zip archive: `<name>/data.pkl` (a pickle of the
//! object, tensors referring to storages through persistent ids) and `<name>/data/<key>` (each
//! storage's raw little-endian bytes). This module runs a small pickle machine that knows the
//! opcodes and globals a state dict uses (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`, typed storages) and
//! nothing else: no code from the file is ever executed, and anything outside that set is an
//! error naming it. (libtorch's own unpickler does not accept `OrderedDict` state dicts.)

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::{Error, Result};

#[derive(Debug, Clone)]
enum Value {
    /// `None`, booleans and floats: read, never used.
    Scalar,
    Int(i64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String),
    Storage {
        kind: Kind,
        key: String,
    },
    Tensor {
        kind: Kind,
        key: String,
        offset: i64,
        size: Vec<i64>,
        stride: Vec<i64>,
    },
    Mark,
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

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> std::result::Result<&[u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or("the pickle ends early")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> std::result::Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> std::result::Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&c| c == b'\n').ok_or("an unterminated line")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn pop(&mut self) -> std::result::Result<Value, String> {
        self.stack.pop().ok_or_else(|| "the pickle stack underflows".to_string())
    }

    fn pop_mark(&mut self) -> std::result::Result<Vec<Value>, String> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("no MARK on the pickle stack")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn string(&mut self, n: usize) -> std::result::Result<Value, String> {
        Ok(Value::Str(String::from_utf8_lossy(self.take(n)?).into_owned()))
    }

    fn reduce(&mut self, f: Value, args: Value) -> std::result::Result<Value, String> {
        let Value::Global(name) = f else { return Err("REDUCE of a non-global".into()) };
        let Value::Tuple(args) = args else {
            return Err("REDUCE without an argument tuple".into());
        };
        let ints = |v: &Value| -> std::result::Result<Vec<i64>, String> {
            match v {
                Value::Tuple(t) | Value::List(t) => t
                    .iter()
                    .map(|x| match x {
                        Value::Int(i) => Ok(*i),
                        _ => Err("a non-integer size or stride".to_string()),
                    })
                    .collect(),
                _ => Err("a size or stride that is not a tuple".into()),
            }
        };
        match name.as_str() {
            "collections.OrderedDict" => Ok(Value::Dict(Vec::new())),
            "torch._utils._rebuild_tensor_v2" => {
                let (Some(Value::Storage { kind, key }), Some(Value::Int(offset))) =
                    (args.first(), args.get(1))
                else {
                    return Err("_rebuild_tensor_v2 without a storage and an offset".into());
                };
                let size = ints(args.get(2).ok_or("_rebuild_tensor_v2 without a size")?)?;
                let stride = ints(args.get(3).ok_or("_rebuild_tensor_v2 without a stride")?)?;
                Ok(Value::Tensor { kind: *kind, key: key.clone(), offset: *offset, size, stride })
            }
            "torch._utils._rebuild_parameter" => {
                args.into_iter().next().ok_or_else(|| "_rebuild_parameter without data".into())
            }
            other => Err(format!("`{other}` is not allowed in a state dict")),
        }
    }

    fn run(&mut self) -> std::result::Result<Value, String> {
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
                    self.stack.push(Value::Global(format!("{module}.{name}")));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.stack.push(Value::Global(format!("{m}.{n}")))
                        }
                        _ => return Err("STACK_GLOBAL of non-strings".into()),
                    }
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    let top = self.stack.last().ok_or("BINPUT on an empty stack")?.clone();
                    self.memo.insert(i, top);
                }
                b'r' => {
                    let i = self.u32()?;
                    let top = self.stack.last().ok_or("LONG_BINPUT on an empty stack")?.clone();
                    self.memo.insert(i, top);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let top = self.stack.last().ok_or("MEMOIZE on an empty stack")?.clone();
                    self.memo.insert(i, top);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' { self.u8()? as u32 } else { self.u32()? };
                    let v = self.memo.get(&i).ok_or("BINGET of an unknown memo entry")?.clone();
                    self.stack.push(v);
                }
                b'(' => self.stack.push(Value::Mark),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("TUPLEn on a short stack".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items));
                }
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b'a' | b'e' => {
                    let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                    match self.stack.last_mut() {
                        Some(Value::List(l)) => l.extend(items),
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
                    let Some(Value::Dict(d)) = self.stack.last_mut() else {
                        return Err("SETITEM on a non-dict".into());
                    };
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64));
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
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    let b = self.take(8)?;
                    let _ = b;
                    self.stack.push(Value::Scalar);
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(s);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(s);
                }
                0x88 | 0x89 | b'N' => self.stack.push(Value::Scalar),
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.reduce(f, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: state set on an object (an OrderedDict's `_metadata`): not needed
                    self.pop()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let Value::Tuple(t) = pid else {
                        return Err("a persistent id that is not a tuple".into());
                    };
                    match (t.first(), t.get(1), t.get(2)) {
                        (Some(Value::Str(tag)), Some(Value::Global(ty)), Some(Value::Str(key)))
                            if tag == "storage" =>
                        {
                            let kind =
                                storage_kind(ty).ok_or_else(|| format!("storage type `{ty}`"))?;
                            self.stack.push(Value::Storage { kind, key: key.clone() });
                        }
                        _ => return Err("a persistent id that is not a storage".into()),
                    }
                }
                b'.' => return self.pop(),
                other => return Err(format!("pickle opcode 0x{other:02x} is not supported")),
            }
        }
    }
}

/// The `(name, tensor)` entries of a dict saved with `torch.save` (zip format, PyTorch ≥ 1.6),
/// in the file's order; entries whose value is not a tensor are skipped. Errors name the file
/// and what is wrong (not a zip, no `data.pkl`, an unsupported pickle construct, a storage that
/// is missing or too short).
pub fn read_torch_dict(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    let path = path.as_ref();
    let corrupt = |reason: String| Error::CorruptFile { file: path.to_path_buf(), reason };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| corrupt(format!("not a torch.save zip: {e}")))?;
    let pkl_name = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(str::to_string))
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or_else(|| corrupt("no data.pkl in the archive".into()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let read = |zip: &mut zip::ZipArchive<std::fs::File>, name: &str| -> Result<Vec<u8>> {
        let mut entry = zip.by_name(name).map_err(|e| corrupt(format!("`{name}`: {e}")))?;
        let mut buf = Vec::new();
        entry.read_to_end(&mut buf).map_err(|e| Error::io(path, e))?;
        Ok(buf)
    };
    if let Ok(order) = read(&mut zip, &format!("{prefix}byteorder")) {
        if order != b"little" {
            return Err(corrupt("big-endian storages are not supported".into()));
        }
    }
    let pkl = read(&mut zip, &pkl_name)?;
    let mut m = Machine { data: &pkl, pos: 0, stack: Vec::new(), memo: HashMap::new() };
    let value = m.run().map_err(corrupt)?;
    let Value::Dict(entries) = value else {
        return Err(corrupt("the file does not hold a dict".into()));
    };
    let mut out = Vec::new();
    for (k, v) in entries {
        let (Value::Str(name), Value::Tensor { kind, key, offset, size, stride }) = (k, v) else {
            continue;
        };
        let bytes = read(&mut zip, &format!("{prefix}data/{key}"))?;
        let elem = kind.elt_size_in_bytes();
        let numel = (bytes.len() / elem) as i64;
        let needed =
            size.iter().zip(&stride).map(|(s, st)| (s - 1).max(0) * st).sum::<i64>() + offset + 1;
        if size.iter().all(|&s| s > 0) && needed > numel {
            return Err(corrupt(format!("the storage of `{name}` is too short")));
        }
        let storage = Tensor::f_from_data_size(&bytes, &[numel], kind)?;
        let t = storage.f_as_strided(&size, &stride, Some(offset))?.f_contiguous()?;
        out.push((name, t));
    }
    Ok(out)
}
