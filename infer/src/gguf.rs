//! A bounded, panic-free reader for GGUF v2/v3 model files, and a writer for tests and tools.
//!
//! # Format (little-endian throughout)
//!
//! ```text
//! magic "GGUF" | version: u32 | tensor_count: u64 | kv_count: u64
//! kv_count x   { key: string | value_type: u32 | value }
//! tensor_count x { name: string | n_dims: u32 | dims: [u64; n_dims] | type: u32 | offset: u64 }
//! padding to `general.alignment` (default 32), then the tensor data section
//! ```
//!
//! A string is `len: u64` then `len` bytes of UTF-8; an array value is
//! `elem_type: u32 | count: u64 | count x value`. Tensor offsets are relative to the start of the
//! data section and must be multiples of the alignment. `dims[0]` is the row length (the
//! fastest-varying dimension). Version 1 (32-bit counts) is refused; version 3 differs from 2
//! only by allowing big-endian files, which are refused too.
//!
//! # Safety against hostile files
//!
//! [`Gguf::open`] reads only the header, through a `BufReader`. Every length and count is checked
//! against the bytes left in the file *before* anything is allocated, so a forged count of `2^60`
//! fails at once; nesting, strings, names, dimensions and the alignment are bounded by the
//! constants below; all arithmetic on sizes and offsets is checked. Errors name the file.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::quant::{self, GgmlType, QuantError, SUPPORTED_TYPE_NAMES};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// The GGUF version [`GgufWriter`] writes.
pub const GGUF_WRITE_VERSION: u32 = 3;

/// Tensor data alignment when the file has no `general.alignment` key (the GGUF default).
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Largest `general.alignment` accepted. Real files use 32 (a few use up to page or huge-page
/// sizes for mmap); anything larger only wastes the file and invites offset overflow.
pub const MAX_ALIGNMENT: u64 = 1 << 20;

/// Longest string value accepted, in bytes. The longest strings in real models are chat
/// templates (tens of KiB); 16 MiB leaves ample room while capping what one length field can
/// make us allocate.
pub const MAX_STRING_LEN: u64 = 16 << 20;

/// Longest metadata key, in bytes: the GGUF specification limits keys to `2^16 - 1` bytes.
pub const MAX_KEY_LEN: u64 = (1 << 16) - 1;

/// Longest tensor name, in bytes: ggml stores names in `char name[GGML_MAX_NAME]` (64, with the
/// terminating NUL), and its own reader refuses longer ones.
pub const MAX_TENSOR_NAME_LEN: u64 = 63;

/// Most tensor dimensions: ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;

/// Deepest nesting of arrays inside arrays. GGUF allows arrays of arrays but no known writer
/// nests them; the bound keeps the recursive value reader's stack small against forged files.
pub const MAX_ARRAY_DEPTH: u32 = 8;

/// Most array elements all metadata arrays may hold together. Each element becomes a 32-byte
/// [`Value`] however few bytes it takes in the file (a `u8` takes one), so counts bounded only by
/// the file size could still multiply memory 32-fold. Real files hold well under a million
/// (vocabularies, merges and token types of ~10^5 entries each); 2^24 caps the total at 512 MiB.
pub const MAX_METADATA_VALUES: u64 = 1 << 24;

/// Most elements to reserve room for up front; longer arrays grow as elements are actually read.
const MAX_INITIAL_CAPACITY: u64 = 1 << 16;

/// Fewest bytes one metadata entry can take: an empty key (8-byte length), the value type (4)
/// and a 1-byte value. Bounds `kv_count` by the bytes left in the file.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;

/// Fewest bytes one tensor info can take: an empty name (8), `n_dims` (4), no dims, the type (4)
/// and the offset (8). Bounds `tensor_count` by the bytes left in the file.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// Largest element count a tensor may have: ggml counts elements in `int64_t`.
const MAX_ELEMENTS: u64 = i64::MAX as u64;

/// The metadata key holding the tensor data alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// GGUF value type ids (`enum gguf_type`).
mod value_type {
    pub(super) const U8: u32 = 0;
    pub(super) const I8: u32 = 1;
    pub(super) const U16: u32 = 2;
    pub(super) const I16: u32 = 3;
    pub(super) const U32: u32 = 4;
    pub(super) const I32: u32 = 5;
    pub(super) const F32: u32 = 6;
    pub(super) const BOOL: u32 = 7;
    pub(super) const STRING: u32 = 8;
    pub(super) const ARRAY: u32 = 9;
    pub(super) const U64: u32 = 10;
    pub(super) const I64: u32 = 11;
    pub(super) const F64: u32 = 12;
}

/// Errors from reading or writing GGUF files. Each reading error names the file.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum GgufError {
    /// An I/O error other than reaching the end of the file.
    #[error("{file}: I/O error: {source}")]
    Io {
        /// The file.
        file: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("{file}: not a GGUF file (magic {found:02x?}, expected \"GGUF\")")]
    BadMagic {
        /// The file.
        file: String,
        /// The first four bytes.
        found: [u8; 4],
    },
    /// A GGUF version other than 2 or 3.
    #[error("{file}: unsupported GGUF version {version}: {reason}")]
    UnsupportedVersion {
        /// The file.
        file: String,
        /// The version field as read (little-endian).
        version: u32,
        /// Why, and what to do.
        reason: &'static str,
    },
    /// The file ends before something it declares.
    #[error(
        "{file}: truncated: {what} needs bytes {start}..{end} but the file is {file_len} bytes"
    )]
    Truncated {
        /// The file.
        file: String,
        /// What was being read ("tensor 'x'", "metadata key 'y'", ...).
        what: String,
        /// First byte needed.
        start: u64,
        /// One past the last byte needed (saturated at `u64::MAX`).
        end: u64,
        /// The file's length.
        file_len: u64,
    },
    /// A metadata value type id outside GGUF's 0..=12.
    #[error("{file}: {what}: unknown value type {type_id}")]
    UnknownValueType {
        /// The file.
        file: String,
        /// Where.
        what: String,
        /// The type id read.
        type_id: u32,
    },
    /// A string (key, name or value) longer than its bound.
    #[error("{file}: {what}: length {len} exceeds the limit of {limit} bytes")]
    StringTooLong {
        /// The file.
        file: String,
        /// Where.
        what: String,
        /// The declared length.
        len: u64,
        /// The bound.
        limit: u64,
    },
    /// A string that is not UTF-8.
    #[error("{file}: {what}: string is not valid UTF-8")]
    InvalidUtf8 {
        /// The file.
        file: String,
        /// Where.
        what: String,
    },
    /// A count (tensors, entries, array elements) that the rest of the file cannot hold.
    #[error(
        "{file}: {what}: count {count} needs at least {min_bytes} bytes but only {remaining} are left in the file"
    )]
    CountTooLarge {
        /// The file.
        file: String,
        /// Which count.
        what: String,
        /// The declared count.
        count: u64,
        /// Smallest size the declared count implies (saturated).
        min_bytes: u64,
        /// Bytes left after the count.
        remaining: u64,
    },
    /// Metadata arrays holding more than [`MAX_METADATA_VALUES`] elements in total.
    #[error("{file}: {what}: metadata arrays hold more than {MAX_METADATA_VALUES} values in total")]
    TooManyValues {
        /// The file.
        file: String,
        /// Where the budget ran out.
        what: String,
    },
    /// Arrays nested deeper than [`MAX_ARRAY_DEPTH`].
    #[error("{file}: {what}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels")]
    TooDeep {
        /// The file.
        file: String,
        /// Where.
        what: String,
    },
    /// A bool byte other than 0 or 1.
    #[error("{file}: {what}: invalid bool byte {byte}")]
    InvalidBool {
        /// The file.
        file: String,
        /// Where.
        what: String,
        /// The byte.
        byte: u8,
    },
    /// A metadata key that appears twice.
    #[error("{file}: duplicate metadata key '{key}'")]
    DuplicateKey {
        /// The file.
        file: String,
        /// The key.
        key: String,
    },
    /// A tensor name that appears twice.
    #[error("{file}: duplicate tensor name '{name}'")]
    DuplicateTensor {
        /// The file.
        file: String,
        /// The name.
        name: String,
    },
    /// A tensor whose shape is invalid (too many dims, overflow, partial blocks).
    #[error("{file}: tensor '{name}': {reason}")]
    BadShape {
        /// The file.
        file: String,
        /// The tensor.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor of a ggml type hashgrid cannot handle.
    #[error(
        "{file}: tensor '{name}' has type {type_name}, which hashgrid does not support (supported: {SUPPORTED_TYPE_NAMES})"
    )]
    UnsupportedTensorType {
        /// The file.
        file: String,
        /// The tensor.
        name: String,
        /// The ggml type id.
        type_id: u32,
        /// ggml's name for it (see [`quant::type_name_of_id`]).
        type_name: String,
    },
    /// `general.alignment` is not a power of two in `1..=MAX_ALIGNMENT`.
    #[error(
        "{file}: {ALIGNMENT_KEY} is {value}; it must be a power of two no larger than {MAX_ALIGNMENT}"
    )]
    BadAlignment {
        /// The file.
        file: String,
        /// The value found.
        value: String,
    },
    /// A tensor whose offset is not a multiple of the alignment.
    #[error(
        "{file}: tensor '{name}' data offset {offset} is not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        /// The file.
        file: String,
        /// The tensor.
        name: String,
        /// Its offset relative to the data section.
        offset: u64,
        /// The alignment.
        alignment: u64,
    },
    /// Two tensors whose data overlap.
    #[error("{file}: the data of tensors '{first}' and '{second}' overlap")]
    OverlappingTensors {
        /// The file.
        file: String,
        /// The tensor that starts first.
        first: String,
        /// The tensor that starts inside it.
        second: String,
    },
    /// A metadata key that is required but absent.
    #[error("{file}: metadata key '{key}' is missing")]
    MissingKey {
        /// The file.
        file: String,
        /// The key.
        key: String,
    },
    /// A metadata value of the wrong type.
    #[error("{file}: metadata key '{key}': expected {expected}, found {found}")]
    WrongType {
        /// The file.
        file: String,
        /// The key.
        key: String,
        /// What the caller asked for.
        expected: &'static str,
        /// What the file has.
        found: String,
    },
    /// A metadata number that does not fit the type asked for.
    #[error("{file}: metadata key '{key}': value {value} does not fit in {expected}")]
    OutOfRange {
        /// The file.
        file: String,
        /// The key.
        key: String,
        /// What the caller asked for.
        expected: &'static str,
        /// The value found.
        value: String,
    },
    /// A tensor's bytes could not be decoded.
    #[error("{file}: tensor '{name}': {source}")]
    Quant {
        /// The file.
        file: String,
        /// The tensor.
        name: String,
        /// The decoding error.
        #[source]
        source: QuantError,
    },
    /// [`GgufWriter`] was given something it cannot write.
    #[error("GGUF writer: {reason}")]
    InvalidWrite {
        /// What is wrong.
        reason: String,
    },
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `uint8` (type 0).
    U8(u8),
    /// `int8` (type 1).
    I8(i8),
    /// `uint16` (type 2).
    U16(u16),
    /// `int16` (type 3).
    I16(i16),
    /// `uint32` (type 4).
    U32(u32),
    /// `int32` (type 5).
    I32(i32),
    /// `uint64` (type 10).
    U64(u64),
    /// `int64` (type 11).
    I64(i64),
    /// `float32` (type 6).
    F32(f32),
    /// `float64` (type 12).
    F64(f64),
    /// `bool` (type 7), one byte 0 or 1.
    Bool(bool),
    /// `string` (type 8).
    String(String),
    /// `array` (type 9). GGUF arrays are homogeneous; an empty array is written with element type
    /// string.
    Array(Vec<Value>),
}

impl Value {
    /// The GGUF type id of this value.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => value_type::U8,
            Value::I8(_) => value_type::I8,
            Value::U16(_) => value_type::U16,
            Value::I16(_) => value_type::I16,
            Value::U32(_) => value_type::U32,
            Value::I32(_) => value_type::I32,
            Value::U64(_) => value_type::U64,
            Value::I64(_) => value_type::I64,
            Value::F32(_) => value_type::F32,
            Value::F64(_) => value_type::F64,
            Value::Bool(_) => value_type::BOOL,
            Value::String(_) => value_type::STRING,
            Value::Array(_) => value_type::ARRAY,
        }
    }

    /// A short description of the value's type for messages: "u32", "string",
    /// "array of 3 string", ...
    pub fn describe(&self) -> String {
        match self {
            Value::Array(items) => match items.first() {
                Some(first) => format!("array of {} {}", items.len(), first.describe()),
                None => "empty array".to_string(),
            },
            other => type_name(other.type_id()).to_string(),
        }
    }

    /// The value as an integer, if it is one of the integer types.
    pub fn as_int(&self) -> Option<i128> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::I8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::U64(v) => Some(v.into()),
            Value::I64(v) => Some(v.into()),
            _ => None,
        }
    }

    /// The value as f32 if it is an F32, or an F64 that is NaN, infinite or within f32's range.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => {
                let f = v as f32;
                (f.is_finite() || !v.is_finite()).then_some(f)
            }
            _ => None,
        }
    }

    /// The string, if the value is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// The name of a GGUF value type id, for messages.
fn type_name(type_id: u32) -> &'static str {
    match type_id {
        value_type::U8 => "u8",
        value_type::I8 => "i8",
        value_type::U16 => "u16",
        value_type::I16 => "i16",
        value_type::U32 => "u32",
        value_type::I32 => "i32",
        value_type::F32 => "f32",
        value_type::BOOL => "bool",
        value_type::STRING => "string",
        value_type::ARRAY => "array",
        value_type::U64 => "u64",
        value_type::I64 => "i64",
        value_type::F64 => "f64",
        _ => "unknown",
    }
}

/// Fewest bytes one value of `type_id` takes in the file (an array: its header), or `None` for an
/// unknown type.
fn min_value_bytes(type_id: u32) -> Option<u64> {
    Some(match type_id {
        value_type::U8 | value_type::I8 | value_type::BOOL => 1,
        value_type::U16 | value_type::I16 => 2,
        value_type::U32 | value_type::I32 | value_type::F32 => 4,
        value_type::U64 | value_type::I64 | value_type::F64 | value_type::STRING => 8,
        value_type::ARRAY => 4 + 8,
        _ => return None,
    })
}

/// One tensor's description from the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name ("blk.0.attn_q.weight").
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the row length (fastest-varying).
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Absolute file offset of the tensor's data.
    pub offset: u64,
    /// Number of elements (the product of `dims`; 1 for no dims).
    pub n_elements: u64,
    /// Number of bytes of data.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Row length: `dims[0]`, or 1 for a tensor without dims.
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Number of rows: the product of `dims[1..]`.
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }
}

/// A parsed GGUF header: metadata and tensor descriptions. Tensor data stays in the file until
/// [`Gguf::read_tensor`] is called.
#[derive(Debug, Clone)]
pub struct Gguf {
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Metadata entries in file order (keys are unique).
    pub metadata: Vec<(String, Value)>,
    /// Tensor descriptions in file order (names are unique).
    pub tensors: Vec<TensorInfo>,
    /// Tensor data alignment in bytes.
    pub alignment: u64,
    /// Absolute offset of the data section.
    data_start: u64,
    /// File length when parsed.
    file_len: u64,
    /// The file (or the name given to [`Gguf::parse_header`]).
    path: PathBuf,
}

impl Gguf {
    /// Opens `path` and parses its header (metadata and tensor infos) through a `BufReader`,
    /// without reading tensor data. All tensor data ranges are checked to lie within the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Gguf, GgufError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let io_err = |source| GgufError::Io {
            file: name.clone(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let file_len = file.metadata().map_err(io_err)?.len();
        let mut gguf = Gguf::parse_header(BufReader::new(file), file_len, &name)?;
        gguf.path = path.to_path_buf();
        Ok(gguf)
    }

    /// Parses a header from `reader`, positioned at the start of a file of `file_len` bytes;
    /// `name` is used in errors (and as the path for [`Gguf::read_tensor`]). Reads exactly the
    /// header's bytes.
    pub fn parse_header(reader: impl Read, file_len: u64, name: &str) -> Result<Gguf, GgufError> {
        HeaderParser {
            r: BoundedReader {
                inner: reader,
                pos: 0,
                file_len,
                file: name,
                values_left: MAX_METADATA_VALUES,
            },
        }
        .parse()
    }

    /// The file name used in errors.
    fn file(&self) -> String {
        self.path.display().to_string()
    }

    /// The path given to [`Gguf::open`] (or the name given to [`Gguf::parse_header`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Absolute offset of the tensor data section.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// The file's length when the header was parsed.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Reads one tensor's bytes from the file by seeking to its offset.
    pub fn read_tensor(&self, info: &TensorInfo) -> Result<Vec<u8>, GgufError> {
        let file = File::open(&self.path).map_err(|source| GgufError::Io {
            file: self.file(),
            source,
        })?;
        self.read_tensor_from(file, info)
    }

    /// Reads one tensor's bytes from `reader`, which holds the same file (for in-memory files).
    pub fn read_tensor_from(
        &self,
        mut reader: impl Read + Seek,
        info: &TensorInfo,
    ) -> Result<Vec<u8>, GgufError> {
        let truncated = || GgufError::Truncated {
            file: self.file(),
            what: format!("tensor '{}'", info.name),
            start: info.offset,
            end: info.offset.saturating_add(info.n_bytes),
            file_len: self.file_len,
        };
        // `parse_header` checked the range against `file_len`, so this allocation is no larger
        // than the file; a shorter file now means it changed under us.
        let end = info
            .offset
            .checked_add(info.n_bytes)
            .ok_or_else(truncated)?;
        if end > self.file_len {
            return Err(truncated());
        }
        let len = usize::try_from(info.n_bytes).map_err(|_| truncated())?;
        let io_err = |source| GgufError::Io {
            file: self.file(),
            source,
        };
        reader.seek(SeekFrom::Start(info.offset)).map_err(io_err)?;
        let mut buf = vec![0u8; len];
        reader.read_exact(&mut buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                truncated()
            } else {
                io_err(e)
            }
        })?;
        Ok(buf)
    }

    /// Reads one tensor and decodes it to f32 (row-major, `dims[0]` fastest).
    pub fn read_tensor_f32(&self, info: &TensorInfo) -> Result<Vec<f32>, GgufError> {
        let bytes = self.read_tensor(info)?;
        self.decode(info, &bytes)
    }

    /// Decodes bytes read for `info` to f32.
    fn decode(&self, info: &TensorInfo, bytes: &[u8]) -> Result<Vec<f32>, GgufError> {
        let quant_err = |source| GgufError::Quant {
            file: self.file(),
            name: info.name.clone(),
            source,
        };
        // Check the byte count before allocating the output.
        let expected = info.ty.row_bytes(info.n_elements).map_err(quant_err)?;
        if expected != bytes.len() as u64 {
            return Err(quant_err(QuantError::ByteLength {
                ty: info.ty,
                n_elems: info.n_elements,
                expected,
                actual: bytes.len() as u64,
            }));
        }
        let n = usize::try_from(info.n_elements).map_err(|_| {
            quant_err(QuantError::SizeOverflow {
                ty: info.ty,
                n_elems: info.n_elements,
            })
        })?;
        let mut out = vec![0.0f32; n];
        quant::dequantize(info.ty, bytes, &mut out).map_err(quant_err)?;
        Ok(out)
    }

    /// The value of metadata key `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The value of `key`, or [`GgufError::MissingKey`].
    fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            file: self.file(),
            key: key.to_string(),
        })
    }

    /// A [`GgufError::WrongType`] for `key`.
    fn wrong_type(&self, key: &str, expected: &'static str, found: String) -> GgufError {
        GgufError::WrongType {
            file: self.file(),
            key: key.to_string(),
            expected,
            found,
        }
    }

    /// Converts an integer value of `key` to `T`.
    fn int_as<T: TryFrom<i128>>(
        &self,
        key: &str,
        v: &Value,
        expected: &'static str,
    ) -> Result<T, GgufError> {
        let i = v
            .as_int()
            .ok_or_else(|| self.wrong_type(key, expected, v.describe()))?;
        T::try_from(i).map_err(|_| GgufError::OutOfRange {
            file: self.file(),
            key: key.to_string(),
            expected,
            value: i.to_string(),
        })
    }

    /// `key` as u32: any integer type whose value fits.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        self.int_as(key, self.require(key)?, "an integer fitting u32")
    }

    /// `key` as u32, or `None` if absent.
    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>, GgufError> {
        self.get(key)
            .map(|v| self.int_as(key, v, "an integer fitting u32"))
            .transpose()
    }

    /// `key` as u64: any integer type whose value fits.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.int_as(key, self.require(key)?, "an integer fitting u64")
    }

    /// `key` as u64, or `None` if absent.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.get(key)
            .map(|v| self.int_as(key, v, "an integer fitting u64"))
            .transpose()
    }

    /// `key` as f32 from an F32 value, or an F64 within f32's range.
    fn f32_of(&self, key: &str, v: &Value) -> Result<f32, GgufError> {
        const EXPECTED: &str = "f32 or f64";
        v.as_f32().ok_or_else(|| match v {
            Value::F64(x) => GgufError::OutOfRange {
                file: self.file(),
                key: key.to_string(),
                expected: "f32",
                value: x.to_string(),
            },
            other => self.wrong_type(key, EXPECTED, other.describe()),
        })
    }

    /// `key` as f32 (accepts F32 and F64).
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        self.f32_of(key, self.require(key)?)
    }

    /// `key` as f32, or `None` if absent.
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        self.get(key).map(|v| self.f32_of(key, v)).transpose()
    }

    /// `key` as a string.
    fn str_of<'a>(&self, key: &str, v: &'a Value) -> Result<&'a str, GgufError> {
        v.as_str()
            .ok_or_else(|| self.wrong_type(key, "string", v.describe()))
    }

    /// `key` as a string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.str_of(key, self.require(key)?)
    }

    /// `key` as a string, or `None` if absent.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.get(key).map(|v| self.str_of(key, v)).transpose()
    }

    /// `key` as a bool.
    fn bool_of(&self, key: &str, v: &Value) -> Result<bool, GgufError> {
        match v {
            Value::Bool(b) => Ok(*b),
            other => Err(self.wrong_type(key, "bool", other.describe())),
        }
    }

    /// `key` as a bool.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        self.bool_of(key, self.require(key)?)
    }

    /// `key` as a bool, or `None` if absent.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.get(key).map(|v| self.bool_of(key, v)).transpose()
    }

    /// The elements of array `key`, each converted by `f`; a non-array, or an element `f`
    /// rejects, gives [`GgufError::WrongType`] (or `f`'s own error).
    fn array_of<'a, T>(
        &self,
        key: &str,
        v: &'a Value,
        expected: &'static str,
        f: impl Fn(&'a Value) -> Result<Option<T>, GgufError>,
    ) -> Result<Vec<T>, GgufError> {
        let Value::Array(items) = v else {
            return Err(self.wrong_type(key, expected, v.describe()));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                f(item)?.ok_or_else(|| {
                    self.wrong_type(
                        key,
                        expected,
                        format!("{} with a {} at index {i}", v.describe(), item.describe()),
                    )
                })
            })
            .collect()
    }

    /// Array `key` as strings.
    fn str_array_of<'a>(&self, key: &str, v: &'a Value) -> Result<Vec<&'a str>, GgufError> {
        self.array_of(key, v, "array of string", |item| Ok(item.as_str()))
    }

    /// Array `key` as borrowed strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        self.str_array_of(key, self.require(key)?)
    }

    /// Array `key` as borrowed strings, or `None` if absent.
    pub fn opt_str_array(&self, key: &str) -> Result<Option<Vec<&str>>, GgufError> {
        self.get(key).map(|v| self.str_array_of(key, v)).transpose()
    }

    /// Array `key` as f32 (F32 or in-range F64 elements).
    fn f32_array_of(&self, key: &str, v: &Value) -> Result<Vec<f32>, GgufError> {
        self.array_of(key, v, "array of f32", |item| Ok(item.as_f32()))
    }

    /// Array `key` as f32 (F32 or in-range F64 elements).
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        self.f32_array_of(key, self.require(key)?)
    }

    /// Array `key` as f32, or `None` if absent.
    pub fn opt_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>, GgufError> {
        self.get(key).map(|v| self.f32_array_of(key, v)).transpose()
    }

    /// Array `key` as i32 (integer elements that fit).
    fn i32_array_of(&self, key: &str, v: &Value) -> Result<Vec<i32>, GgufError> {
        const EXPECTED: &str = "array of integers fitting i32";
        self.array_of(key, v, EXPECTED, |item| match item.as_int() {
            None => Ok(None),
            Some(i) => i32::try_from(i)
                .map(Some)
                .map_err(|_| GgufError::OutOfRange {
                    file: self.file(),
                    key: key.to_string(),
                    expected: "i32",
                    value: i.to_string(),
                }),
        })
    }

    /// Array `key` as i32 (any integer elements that fit).
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        self.i32_array_of(key, self.require(key)?)
    }

    /// Array `key` as i32, or `None` if absent.
    pub fn opt_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>, GgufError> {
        self.get(key).map(|v| self.i32_array_of(key, v)).transpose()
    }
}

/// What the parser is reading, for error messages; formatted only when an error happens.
#[derive(Debug, Clone, Copy)]
enum Ctx<'a> {
    /// A fixed header field.
    Field(&'static str),
    /// The key of metadata entry `i`.
    KeyOf(u64),
    /// The value of metadata key `k`.
    Value(&'a str),
    /// The name of tensor info `i`.
    NameOf(u64),
    /// The info or data of tensor `name`.
    Tensor(&'a str),
}

impl fmt::Display for Ctx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ctx::Field(name) => write!(f, "header field {name}"),
            Ctx::KeyOf(i) => write!(f, "the key of metadata entry {i}"),
            Ctx::Value(key) => write!(f, "metadata key '{key}'"),
            Ctx::NameOf(i) => write!(f, "the name of tensor {i}"),
            Ctx::Tensor(name) => write!(f, "tensor '{name}'"),
        }
    }
}

/// A reader that knows its position and the file length, and refuses to read past the end.
struct BoundedReader<'f, R> {
    /// The underlying reader.
    inner: R,
    /// Bytes read so far.
    pos: u64,
    /// The file's length.
    file_len: u64,
    /// File name for errors.
    file: &'f str,
    /// Array elements still allowed by [`MAX_METADATA_VALUES`].
    values_left: u64,
}

impl<R: Read> BoundedReader<'_, R> {
    /// Bytes left in the file.
    fn remaining(&self) -> u64 {
        self.file_len.saturating_sub(self.pos)
    }

    /// A [`GgufError::Truncated`] for `n` bytes at the current position.
    fn truncated(&self, n: u64, ctx: Ctx<'_>) -> GgufError {
        GgufError::Truncated {
            file: self.file.to_string(),
            what: ctx.to_string(),
            start: self.pos,
            end: self.pos.saturating_add(n),
            file_len: self.file_len,
        }
    }

    /// Reads exactly `buf.len()` bytes, which must lie within the file.
    fn fill(&mut self, buf: &mut [u8], ctx: Ctx<'_>) -> Result<(), GgufError> {
        let n = buf.len() as u64;
        if n > self.remaining() {
            return Err(self.truncated(n, ctx));
        }
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                self.truncated(n, ctx)
            } else {
                GgufError::Io {
                    file: self.file.to_string(),
                    source: e,
                }
            }
        })?;
        self.pos += n;
        Ok(())
    }

    /// Reads a fixed-size field.
    fn array<const N: usize>(&mut self, ctx: Ctx<'_>) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.fill(&mut buf, ctx)?;
        Ok(buf)
    }

    /// Reads a little-endian u32.
    fn u32(&mut self, ctx: Ctx<'_>) -> Result<u32, GgufError> {
        self.array(ctx).map(u32::from_le_bytes)
    }

    /// Reads a little-endian u64.
    fn u64(&mut self, ctx: Ctx<'_>) -> Result<u64, GgufError> {
        self.array(ctx).map(u64::from_le_bytes)
    }

    /// Checks that `count` items of at least `min_bytes` each fit in the rest of the file.
    fn check_count(&self, count: u64, min_bytes: u64, ctx: Ctx<'_>) -> Result<(), GgufError> {
        let need = count.saturating_mul(min_bytes);
        if need > self.remaining() {
            return Err(GgufError::CountTooLarge {
                file: self.file.to_string(),
                what: ctx.to_string(),
                count,
                min_bytes: need,
                remaining: self.remaining(),
            });
        }
        Ok(())
    }

    /// Reads a string of at most `limit` bytes (and no more than the file has left).
    fn string(&mut self, limit: u64, ctx: Ctx<'_>) -> Result<String, GgufError> {
        let len = self.u64(ctx)?;
        if len > limit {
            return Err(GgufError::StringTooLong {
                file: self.file.to_string(),
                what: ctx.to_string(),
                len,
                limit,
            });
        }
        if len > self.remaining() {
            return Err(self.truncated(len, ctx));
        }
        // len <= MAX_STRING_LEN and <= the bytes left: a bounded, justified allocation.
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| self.truncated(len, ctx))?];
        self.fill(&mut buf, ctx)?;
        String::from_utf8(buf).map_err(|_| GgufError::InvalidUtf8 {
            file: self.file.to_string(),
            what: ctx.to_string(),
        })
    }

    /// Reads one value of type `type_id`, with arrays nested at most `depth_left` more levels.
    fn value(&mut self, type_id: u32, depth_left: u32, ctx: Ctx<'_>) -> Result<Value, GgufError> {
        use value_type as t;
        Ok(match type_id {
            t::U8 => Value::U8(u8::from_le_bytes(self.array(ctx)?)),
            t::I8 => Value::I8(i8::from_le_bytes(self.array(ctx)?)),
            t::U16 => Value::U16(u16::from_le_bytes(self.array(ctx)?)),
            t::I16 => Value::I16(i16::from_le_bytes(self.array(ctx)?)),
            t::U32 => Value::U32(u32::from_le_bytes(self.array(ctx)?)),
            t::I32 => Value::I32(i32::from_le_bytes(self.array(ctx)?)),
            t::U64 => Value::U64(u64::from_le_bytes(self.array(ctx)?)),
            t::I64 => Value::I64(i64::from_le_bytes(self.array(ctx)?)),
            t::F32 => Value::F32(f32::from_le_bytes(self.array(ctx)?)),
            t::F64 => Value::F64(f64::from_le_bytes(self.array(ctx)?)),
            t::BOOL => match self.array::<1>(ctx)? {
                [0] => Value::Bool(false),
                [1] => Value::Bool(true),
                [byte] => {
                    return Err(GgufError::InvalidBool {
                        file: self.file.to_string(),
                        what: ctx.to_string(),
                        byte,
                    });
                }
            },
            t::STRING => Value::String(self.string(MAX_STRING_LEN, ctx)?),
            t::ARRAY => {
                let Some(depth_left) = depth_left.checked_sub(1) else {
                    return Err(GgufError::TooDeep {
                        file: self.file.to_string(),
                        what: ctx.to_string(),
                    });
                };
                let elem_type = self.u32(ctx)?;
                let min =
                    min_value_bytes(elem_type).ok_or_else(|| self.unknown_type(elem_type, ctx))?;
                let count = self.u64(ctx)?;
                self.check_count(count, min, ctx)?;
                self.values_left = self.values_left.checked_sub(count).ok_or_else(|| {
                    GgufError::TooManyValues {
                        file: self.file.to_string(),
                        what: ctx.to_string(),
                    }
                })?;
                let capacity = count.min(MAX_INITIAL_CAPACITY);
                let mut items = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
                for _ in 0..count {
                    items.push(self.value(elem_type, depth_left, ctx)?);
                }
                Value::Array(items)
            }
            other => return Err(self.unknown_type(other, ctx)),
        })
    }

    /// A [`GgufError::UnknownValueType`].
    fn unknown_type(&self, type_id: u32, ctx: Ctx<'_>) -> GgufError {
        GgufError::UnknownValueType {
            file: self.file.to_string(),
            what: ctx.to_string(),
            type_id,
        }
    }
}

/// Parses a header from a [`BoundedReader`].
struct HeaderParser<'f, R> {
    /// The input.
    r: BoundedReader<'f, R>,
}

impl<R: Read> HeaderParser<'_, R> {
    /// The file name for errors.
    fn file(&self) -> String {
        self.r.file.to_string()
    }

    /// Parses the whole header and validates the tensor layout.
    fn parse(mut self) -> Result<Gguf, GgufError> {
        let magic: [u8; 4] = self.r.array(Ctx::Field("magic"))?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic {
                file: self.file(),
                found: magic,
            });
        }
        let version = self.r.u32(Ctx::Field("version"))?;
        let reason = match version {
            2 | 3 => None,
            1 => Some(
                "GGUF v1 (32-bit counts) is obsolete; re-convert the model with a current llama.cpp",
            ),
            0x0200_0000 | 0x0300_0000 => {
                Some("this is a big-endian GGUF file; only little-endian files are supported")
            }
            _ => Some("only versions 2 and 3 are supported"),
        };
        if let Some(reason) = reason {
            return Err(GgufError::UnsupportedVersion {
                file: self.file(),
                version,
                reason,
            });
        }
        let tensor_count = self.r.u64(Ctx::Field("tensor_count"))?;
        let kv_count = self.r.u64(Ctx::Field("kv_count"))?;
        self.r
            .check_count(kv_count, MIN_KV_BYTES, Ctx::Field("kv_count"))?;
        self.r.check_count(
            tensor_count,
            MIN_TENSOR_INFO_BYTES,
            Ctx::Field("tensor_count"),
        )?;

        let metadata = self.metadata(kv_count)?;
        let alignment = self.alignment(&metadata)?;
        let raw = self.tensor_infos(tensor_count)?;
        let header_end = self.r.pos;
        let data_start = align_up(header_end, alignment).ok_or_else(|| GgufError::Truncated {
            file: self.file(),
            what: "the data section".to_string(),
            start: header_end,
            end: u64::MAX,
            file_len: self.r.file_len,
        })?;
        let tensors = self.place_tensors(raw, data_start, alignment)?;
        Ok(Gguf {
            version,
            metadata,
            tensors,
            alignment,
            data_start,
            file_len: self.r.file_len,
            path: PathBuf::from(self.r.file),
        })
    }

    /// Reads `kv_count` metadata entries, refusing duplicate keys.
    fn metadata(&mut self, kv_count: u64) -> Result<Vec<(String, Value)>, GgufError> {
        let mut seen = HashSet::new();
        let capacity = kv_count.min(MAX_INITIAL_CAPACITY);
        let mut metadata = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
        for i in 0..kv_count {
            let key = self.r.string(MAX_KEY_LEN, Ctx::KeyOf(i))?;
            if !seen.insert(key.clone()) {
                return Err(GgufError::DuplicateKey {
                    file: self.file(),
                    key,
                });
            }
            let ctx = Ctx::Value(&key);
            let type_id = self.r.u32(ctx)?;
            let value = self.r.value(type_id, MAX_ARRAY_DEPTH, ctx)?;
            metadata.push((key, value));
        }
        Ok(metadata)
    }

    /// The alignment from `general.alignment`, or the default.
    fn alignment(&self, metadata: &[(String, Value)]) -> Result<u64, GgufError> {
        let Some((_, v)) = metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) else {
            return Ok(DEFAULT_ALIGNMENT);
        };
        let bad = || GgufError::BadAlignment {
            file: self.file(),
            value: match v.as_int() {
                Some(i) => i.to_string(),
                None => format!("a {}", v.describe()),
            },
        };
        let a = v
            .as_int()
            .and_then(|i| u64::try_from(i).ok())
            .ok_or_else(bad)?;
        if a.is_power_of_two() && a <= MAX_ALIGNMENT {
            Ok(a)
        } else {
            Err(bad())
        }
    }

    /// Reads `tensor_count` tensor infos (offsets still relative to the data section), refusing
    /// duplicates, unsupported types and invalid shapes.
    fn tensor_infos(&mut self, tensor_count: u64) -> Result<Vec<TensorInfo>, GgufError> {
        let mut seen = HashSet::new();
        let capacity = tensor_count.min(MAX_INITIAL_CAPACITY);
        let mut tensors = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
        for i in 0..tensor_count {
            let name = self.r.string(MAX_TENSOR_NAME_LEN, Ctx::NameOf(i))?;
            if !seen.insert(name.clone()) {
                return Err(GgufError::DuplicateTensor {
                    file: self.file(),
                    name,
                });
            }
            let ctx = Ctx::Tensor(&name);
            let n_dims = self.r.u32(ctx)?;
            if n_dims > MAX_DIMS {
                return Err(
                    self.bad_shape(&name, format!("{n_dims} dimensions (at most {MAX_DIMS})"))
                );
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(self.r.u64(ctx)?);
            }
            let type_id = self.r.u32(ctx)?;
            let offset = self.r.u64(ctx)?;
            let ty =
                GgmlType::from_u32(type_id).ok_or_else(|| GgufError::UnsupportedTensorType {
                    file: self.file(),
                    name: name.clone(),
                    type_id,
                    type_name: quant::type_name_of_id(type_id),
                })?;
            let (n_elements, n_bytes) = self.shape_size(&name, &dims, ty)?;
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_elements,
                n_bytes,
            });
        }
        Ok(tensors)
    }

    /// A [`GgufError::BadShape`].
    fn bad_shape(&self, name: &str, reason: String) -> GgufError {
        GgufError::BadShape {
            file: self.file(),
            name: name.to_string(),
            reason,
        }
    }

    /// Element count and byte size of a tensor, with overflow and block checks.
    fn shape_size(&self, name: &str, dims: &[u64], ty: GgmlType) -> Result<(u64, u64), GgufError> {
        let overflow = || self.bad_shape(name, format!("dimensions {dims:?} overflow"));
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= MAX_ELEMENTS)
            .ok_or_else(overflow)?;
        let row_len = dims.first().copied().unwrap_or(1);
        let n_rows: u64 = dims.iter().skip(1).product(); // <= n_elements unless row_len is 0
        let row_bytes = ty.row_bytes(row_len).map_err(|e| match e {
            QuantError::NotBlockMultiple { .. } => self.bad_shape(
                name,
                format!(
                    "row length {row_len} is not a multiple of {ty}'s block size {}",
                    ty.block_elems()
                ),
            ),
            _ => overflow(),
        })?;
        let n_bytes = if row_len == 0 {
            0
        } else {
            row_bytes.checked_mul(n_rows).ok_or_else(overflow)?
        };
        Ok((n_elements, n_bytes))
    }

    /// Makes offsets absolute and checks alignment, bounds and overlap.
    fn place_tensors(
        &self,
        raw: Vec<TensorInfo>,
        data_start: u64,
        alignment: u64,
    ) -> Result<Vec<TensorInfo>, GgufError> {
        let file_len = self.r.file_len;
        let mut tensors = Vec::with_capacity(raw.len());
        for mut info in raw {
            if info.offset % alignment != 0 {
                return Err(GgufError::MisalignedTensor {
                    file: self.file(),
                    name: info.name,
                    offset: info.offset,
                    alignment,
                });
            }
            let start = data_start.checked_add(info.offset);
            let end = start.and_then(|s| s.checked_add(info.n_bytes));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    let start = start.unwrap_or(u64::MAX);
                    return Err(GgufError::Truncated {
                        file: self.file(),
                        what: format!("tensor '{}'", info.name),
                        start,
                        end: start.saturating_add(info.n_bytes),
                        file_len,
                    });
                }
            }
            info.offset = start.unwrap_or(u64::MAX);
            tensors.push(info);
        }
        // Overlap check on the non-empty tensors, in offset order.
        let mut order: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
        order.sort_by_key(|t| t.offset);
        for pair in order.windows(2) {
            if let [a, b] = pair
                && a.offset.saturating_add(a.n_bytes) > b.offset
            {
                return Err(GgufError::OverlappingTensors {
                    file: self.file(),
                    first: a.name.clone(),
                    second: b.name.clone(),
                });
            }
        }
        Ok(tensors)
    }
}

/// `v` rounded up to a multiple of `align` (a power of two), or `None` on overflow.
fn align_up(v: u64, align: u64) -> Option<u64> {
    let mask = align.checked_sub(1)?;
    v.checked_add(mask).map(|x| x & !mask)
}

/// A tensor queued in a [`GgufWriter`].
#[derive(Debug, Clone)]
struct PendingTensor {
    /// Name.
    name: String,
    /// Dimensions, ggml order.
    dims: Vec<u64>,
    /// Type.
    ty: GgmlType,
    /// Encoded bytes.
    data: Vec<u8>,
}

/// Builds a GGUF v3 file: metadata values and tensors, written with alignment padding.
///
/// The alignment is `general.alignment` if that key is added (it must then be a power of two up
/// to [`MAX_ALIGNMENT`]), else [`DEFAULT_ALIGNMENT`]. Each tensor's data starts aligned and is
/// followed by zero padding to the alignment.
#[derive(Debug, Clone, Default)]
pub struct GgufWriter {
    /// Metadata in insertion order.
    metadata: Vec<(String, Value)>,
    /// Tensors in insertion order.
    tensors: Vec<PendingTensor>,
}

/// A [`GgufError::InvalidWrite`].
fn invalid(reason: String) -> GgufError {
    GgufError::InvalidWrite { reason }
}

impl GgufWriter {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds metadata entry `key = value`. Refuses duplicate or over-long keys, over-long strings,
    /// mixed-type or over-nested arrays, and an invalid `general.alignment`.
    pub fn add_metadata(&mut self, key: impl Into<String>, value: Value) -> Result<(), GgufError> {
        let key = key.into();
        if key.len() as u64 > MAX_KEY_LEN {
            return Err(invalid(format!(
                "metadata key of {} bytes is too long",
                key.len()
            )));
        }
        if self.metadata.iter().any(|(k, _)| *k == key) {
            return Err(invalid(format!("duplicate metadata key '{key}'")));
        }
        check_value(&key, &value, MAX_ARRAY_DEPTH)?;
        if key == ALIGNMENT_KEY {
            let ok = value
                .as_int()
                .and_then(|i| u64::try_from(i).ok())
                .is_some_and(|a| a.is_power_of_two() && a <= MAX_ALIGNMENT);
            if !ok {
                return Err(invalid(format!(
                    "{ALIGNMENT_KEY} must be a power of two no larger than {MAX_ALIGNMENT}"
                )));
            }
        }
        self.metadata.push((key, value));
        Ok(())
    }

    /// Adds a tensor with already-encoded `data`, which must be exactly the size `dims` and `ty`
    /// call for.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        data: Vec<u8>,
    ) -> Result<(), GgufError> {
        let name = name.into();
        if name.len() as u64 > MAX_TENSOR_NAME_LEN {
            return Err(invalid(format!(
                "tensor name '{name}' is longer than {MAX_TENSOR_NAME_LEN} bytes"
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(invalid(format!("duplicate tensor name '{name}'")));
        }
        if dims.len() > MAX_DIMS as usize {
            return Err(invalid(format!(
                "tensor '{name}' has {} dimensions (at most {MAX_DIMS})",
                dims.len()
            )));
        }
        let expected = expected_bytes(dims, ty)
            .map_err(|reason| invalid(format!("tensor '{name}': {reason}")))?;
        if expected != data.len() as u64 {
            return Err(invalid(format!(
                "tensor '{name}': {ty} {dims:?} takes {expected} bytes, but {} were given",
                data.len()
            )));
        }
        self.tensors.push(PendingTensor {
            name,
            dims: dims.to_vec(),
            ty,
            data,
        });
        Ok(())
    }

    /// Quantizes `values` (row-major, `dims[0]` fastest) to `ty` and adds the tensor.
    pub fn add_tensor_f32(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        values: &[f32],
    ) -> Result<(), GgufError> {
        let name = name.into();
        let n: Option<u64> = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        if n != Some(values.len() as u64) {
            return Err(invalid(format!(
                "tensor '{name}': dims {dims:?} do not match {} values",
                values.len()
            )));
        }
        // Rows are whole blocks (checked by quantize on the row length below), so quantizing the
        // flat slice equals quantizing row by row.
        expected_bytes(dims, ty).map_err(|reason| invalid(format!("tensor '{name}': {reason}")))?;
        let data =
            quant::quantize(ty, values).map_err(|e| invalid(format!("tensor '{name}': {e}")))?;
        self.add_tensor(name, dims, ty, data)
    }

    /// The alignment the file will use.
    fn alignment(&self) -> u64 {
        self.metadata
            .iter()
            .find(|(k, _)| k == ALIGNMENT_KEY)
            .and_then(|(_, v)| v.as_int())
            .and_then(|i| u64::try_from(i).ok())
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// Writes the file to `w`.
    pub fn write_to(&self, mut w: impl Write) -> Result<(), GgufError> {
        let bytes = self.header_bytes()?;
        let io_err = |source| GgufError::Io {
            file: "<GGUF writer>".to_string(),
            source,
        };
        w.write_all(&bytes).map_err(io_err)?;
        let alignment = self.alignment();
        let zeros = vec![0u8; usize::try_from(alignment).unwrap_or(0)];
        let pad = |len: u64| -> usize {
            let padded = align_up(len, alignment).unwrap_or(len);
            usize::try_from(padded.saturating_sub(len)).unwrap_or(0)
        };
        w.write_all(zeros.get(..pad(bytes.len() as u64)).unwrap_or(&[]))
            .map_err(io_err)?;
        for t in &self.tensors {
            w.write_all(&t.data).map_err(io_err)?;
            w.write_all(zeros.get(..pad(t.data.len() as u64)).unwrap_or(&[]))
                .map_err(io_err)?;
        }
        w.flush().map_err(io_err)
    }

    /// Writes the file to `path` (created or truncated).
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<(), GgufError> {
        let path = path.as_ref();
        let file = File::create(path).map_err(|source| GgufError::Io {
            file: path.display().to_string(),
            source,
        })?;
        self.write_to(BufWriter::new(file)).map_err(|e| match e {
            GgufError::Io { source, .. } => GgufError::Io {
                file: path.display().to_string(),
                source,
            },
            other => other,
        })
    }

    /// The whole file as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let mut out = Vec::new();
        self.write_to(&mut out)?;
        Ok(out)
    }

    /// Magic, counts, metadata and tensor infos (no padding).
    fn header_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let alignment = self.alignment();
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&GGUF_WRITE_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            out.extend_from_slice(&value.type_id().to_le_bytes());
            put_value(&mut out, value);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset = offset
                .checked_add(t.data.len() as u64)
                .and_then(|end| align_up(end, alignment))
                .ok_or_else(|| invalid("tensor data overflows u64".to_string()))?;
        }
        Ok(out)
    }
}

/// Bytes that a tensor of `dims` and `ty` takes, or why it is invalid.
fn expected_bytes(dims: &[u64], ty: GgmlType) -> Result<u64, String> {
    let row_len = dims.first().copied().unwrap_or(1);
    let n_rows = dims
        .iter()
        .skip(1)
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or("dimensions overflow")?;
    let n = row_len.checked_mul(n_rows).ok_or("dimensions overflow")?;
    if n > MAX_ELEMENTS {
        return Err("dimensions overflow".to_string());
    }
    let row_bytes = ty.row_bytes(row_len).map_err(|e| e.to_string())?;
    row_bytes
        .checked_mul(n_rows)
        .ok_or_else(|| "size overflows".to_string())
}

/// Checks that `value` can be written: strings within bounds, arrays homogeneous and not nested
/// deeper than `depth_left`.
fn check_value(key: &str, value: &Value, depth_left: u32) -> Result<(), GgufError> {
    match value {
        Value::String(s) if s.len() as u64 > MAX_STRING_LEN => Err(invalid(format!(
            "metadata key '{key}': string of {} bytes is too long",
            s.len()
        ))),
        Value::Array(items) => {
            let Some(depth_left) = depth_left.checked_sub(1) else {
                return Err(invalid(format!(
                    "metadata key '{key}': arrays nested too deep"
                )));
            };
            if let Some(first) = items.first()
                && items.iter().any(|v| v.type_id() != first.type_id())
            {
                return Err(invalid(format!(
                    "metadata key '{key}': GGUF arrays must hold one type"
                )));
            }
            items
                .iter()
                .try_for_each(|v| check_value(key, v, depth_left))
        }
        _ => Ok(()),
    }
}

/// Appends a GGUF string.
fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends a value's payload (not its type id).
fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            let elem = items.first().map_or(value_type::STRING, Value::type_id);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

#[cfg(test)]
mod tests;
