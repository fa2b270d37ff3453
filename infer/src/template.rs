//! Chat templates: renders a GGUF `tokenizer.chat_template` (a Jinja template
//! written for Hugging Face `transformers`) with minijinja.
//!
//! The environment mirrors the one `transformers` renders chat templates in:
//! `trim_blocks` and `lstrip_blocks` on, loop controls (`break`/`continue`),
//! Python string and dict methods (`.strip()`, `.split()`, `.items()`, ... via
//! `minijinja-contrib`'s pycompat), a `tojson` filter that writes JSON the
//! way Python's `json.dumps(ensure_ascii=False)` does, and the globals
//! `raise_exception(message)` and `strftime_now(format)` (UTC). The context
//! has `messages`, `add_generation_prompt`, `bos_token` and `eos_token`.
//!
//! A template comes from an untrusted file, so it is bounded: at most
//! [`MAX_TEMPLATE_BYTES`] of source, [`TEMPLATE_FUEL`] executed instructions
//! (so loops end) and [`MAX_OUTPUT_BYTES`] of output. minijinja itself caps
//! recursion depth and the length of one repeated string (`'x' * n`, 100 MB).

use std::io::Write;
use std::sync::{Arc, Mutex};

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

/// Largest accepted template source, in bytes.
pub const MAX_TEMPLATE_BYTES: usize = 256 * 1024;
/// Instruction budget of one rendering (minijinja fuel).
pub const TEMPLATE_FUEL: u64 = 2_000_000;
/// Largest rendered prompt, in bytes.
pub const MAX_OUTPUT_BYTES: usize = 16 * 1024 * 1024;

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ChatMessage {
    /// `"system"`, `"user"`, `"assistant"`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with this role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Why a chat template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// The template source is too large.
    #[error("the chat template is {len} bytes, more than the supported {max}")]
    TooLarge {
        /// Source length.
        len: usize,
        /// [`MAX_TEMPLATE_BYTES`].
        max: usize,
    },
    /// The template does not parse.
    #[error("the chat template does not parse: {0}")]
    Syntax(String),
    /// The template called `raise_exception(message)`.
    #[error("the chat template raised an exception: {0}")]
    Raised(String),
    /// The template executed more than [`TEMPLATE_FUEL`] instructions.
    #[error("the chat template ran more than {0} instructions")]
    OutOfFuel(u64),
    /// The output grew past [`MAX_OUTPUT_BYTES`].
    #[error("the chat template produced more than {0} bytes")]
    OutputTooLarge(usize),
    /// Any other failure while rendering (undefined filter, type error, ...).
    #[error("the chat template failed to render: {0}")]
    Render(String),
}

/// A `Write` that refuses to grow past a limit.
struct BoundedWriter {
    buf: Vec<u8>,
    max: usize,
    overflowed: bool,
}

impl Write for BoundedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.max {
            self.overflowed = true;
            return Err(std::io::Error::other("chat template output too large"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders `template` for `messages`, as `transformers`'
/// `apply_chat_template(messages, add_generation_prompt=..., tokenize=False)`
/// does, with `bos_token` / `eos_token` as the template variables of those
/// names.
pub fn render_chat(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, TemplateError> {
    if template.len() > MAX_TEMPLATE_BYTES {
        return Err(TemplateError::TooLarge {
            len: template.len(),
            max: MAX_TEMPLATE_BYTES,
        });
    }
    let raised: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function("strftime_now", strftime_now);
    let slot = Arc::clone(&raised);
    env.add_function(
        "raise_exception",
        move |message: String| -> Result<Value, Error> {
            if let Ok(mut guard) = slot.lock() {
                *guard = Some(message.clone());
            }
            Err(Error::new(ErrorKind::InvalidOperation, message))
        },
    );

    let tmpl = env
        .template_from_str(template)
        .map_err(|e| TemplateError::Syntax(describe(&e)))?;
    let ctx = minijinja::context! {
        messages => Value::from_serialize(messages),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    };
    let mut out = BoundedWriter {
        buf: Vec::new(),
        max: MAX_OUTPUT_BYTES,
        overflowed: false,
    };
    match tmpl.render_captured_to(ctx, &mut out) {
        Ok(_) => String::from_utf8(out.buf).map_err(|e| TemplateError::Render(e.to_string())),
        Err(e) => {
            if let Some(message) = raised.lock().ok().and_then(|mut g| g.take()) {
                return Err(TemplateError::Raised(message));
            }
            if out.overflowed {
                return Err(TemplateError::OutputTooLarge(MAX_OUTPUT_BYTES));
            }
            if e.kind() == ErrorKind::OutOfFuel {
                return Err(TemplateError::OutOfFuel(TEMPLATE_FUEL));
            }
            Err(TemplateError::Render(describe(&e)))
        }
    }
}

/// An error with its chain of causes.
fn describe(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The `tojson` filter: Python's `json.dumps(value, ensure_ascii=False,
/// indent=None, separators=None, sort_keys=False)` with those keyword
/// arguments honoured.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                let n = i64::try_from(v)?;
                Some(" ".repeat(usize::try_from(n.clamp(0, 64)).unwrap_or(0)))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let item = v.get_item(&Value::from(0))?;
            let key = v.get_item(&Value::from(1))?;
            match (item.as_str(), key.as_str()) {
                (Some(i), Some(k)) => (i.to_string(), k.to_string()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ));
                }
            }
        }
        _ => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    let opts = JsonOpts {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&value, &opts, 0, &mut out)?;
    Ok(Value::from(out))
}

/// Formatting options of [`write_json`].
struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

/// Deepest nesting `tojson` writes.
const MAX_JSON_DEPTH: usize = 128;

fn write_json(value: &Value, opts: &JsonOpts, depth: usize, out: &mut String) -> Result<(), Error> {
    if depth > MAX_JSON_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value nested too deeply",
        ));
    }
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                out.push_str(&value.to_string());
            } else {
                let f = f64::try_from(value.clone())?;
                out.push_str(&python_float_repr(f));
            }
        }
        ValueKind::String => {
            write_json_string(value.as_str().unwrap_or(""), opts.ensure_ascii, out)
        }
        ValueKind::Bytes => {
            let bytes = value.as_bytes().unwrap_or(&[]);
            write_json_string(&String::from_utf8_lossy(bytes), opts.ensure_ascii, out);
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key), item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(opts, depth + 1, out);
                write_json_string(key, opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                write_json(item, opts, depth + 1, out)?;
            }
            newline_indent(opts, depth, out);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(opts, depth + 1, out);
                write_json(item, opts, depth + 1, out)?;
            }
            newline_indent(opts, depth, out);
            out.push(']');
        }
        _ => write_json_string(&value.to_string(), opts.ensure_ascii, out),
    }
    Ok(())
}

/// A map key as Python's `json` writes it.
fn json_key(key: &Value) -> String {
    match key.kind() {
        ValueKind::String => key.as_str().unwrap_or("").to_string(),
        ValueKind::None | ValueKind::Undefined => "null".to_string(),
        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_string(),
        ValueKind::Number if !key.is_integer() => {
            f64::try_from(key.clone()).map_or_else(|_| key.to_string(), python_float_repr)
        }
        _ => key.to_string(),
    }
}

fn newline_indent(opts: &JsonOpts, depth: usize, out: &mut String) {
    if let Some(indent) = &opts.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(indent);
        }
    }
}

fn write_json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 || (ensure_ascii && u32::from(c) > 0x7E) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, positional for
/// exponents -4..16, else `d.ddde+XX`.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    // `{:e}` gives the shortest round-trip digits, e.g. "1.5e-7", "-2e3".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = mantissa
        .strip_prefix('-')
        .map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!(
                "0.{}{}",
                "0".repeat(usize::try_from(-point).unwrap_or(0)),
                digits
            )
        } else {
            let point = usize::try_from(point).unwrap_or(0);
            if digits.len() <= point {
                format!("{}{}.0", digits, "0".repeat(point - digits.len()))
            } else {
                format!(
                    "{}.{}",
                    digits.get(..point).unwrap_or(""),
                    digits.get(point..).unwrap_or("")
                )
            }
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1.min(digits.len()));
        let mant = if rest.is_empty() {
            first.to_string()
        } else {
            format!("{first}.{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mant}e{esign}{:02}", exp.unsigned_abs())
    }
}

/// The `strftime_now(format)` global: the current UTC time formatted with
/// the common `strftime` directives (`%Y %m %d %H %M %S %y %b %B %a %A %j
/// %p %I %e %%`, and `%-d`-style unpadded forms).
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(Value::from(strftime_utc(&format, secs)))
}

/// Formats the UTC time `secs` after the Unix epoch.
fn strftime_utc(format: &str, secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUMULATIVE: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let month_idx = usize::try_from(month - 1).unwrap_or(0).min(11);
    let yday = CUMULATIVE[month_idx] + day + i64::from(leap && month > 2);
    let weekday = usize::try_from((days + 3).rem_euclid(7)).unwrap_or(0); // 1970-01-01 was a Thursday
    let month_name = MONTHS[month_idx];
    let day_name = DAYS[weekday.min(6)];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let num = |v: i64, width: usize| {
            if unpadded {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&num(year.rem_euclid(100), 2)),
            Some('m') => out.push_str(&num(month, 2)),
            Some('d') => out.push_str(&num(day, 2)),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('H') => out.push_str(&num(i64::try_from(hour).unwrap_or(0), 2)),
            Some('I') => out.push_str(&num(i64::try_from(hour12).unwrap_or(0), 2)),
            Some('M') => out.push_str(&num(i64::try_from(minute).unwrap_or(0), 2)),
            Some('S') => out.push_str(&num(i64::try_from(second).unwrap_or(0), 2)),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('b') => out.push_str(month_name.get(..3).unwrap_or(month_name)),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(day_name.get(..3).unwrap_or(day_name)),
            Some('A') => out.push_str(day_name),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_like_python() {
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(0.5), "0.5");
        assert_eq!(python_float_repr(-2.25), "-2.25");
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(123456789012345.6), "123456789012345.6");
        assert_eq!(python_float_repr(0.0001), "0.0001");
        assert_eq!(python_float_repr(0.00001), "1e-05");
        assert_eq!(python_float_repr(1.5e-7), "1.5e-07");
        assert_eq!(python_float_repr(0.1 + 0.2), "0.30000000000000004");
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-07-26 13:05:09 UTC, a Friday, day 208 of a leap year.
        let t = 1_722_085_509 - 86_400;
        assert_eq!(strftime_utc("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime_utc("%A %B %-d, %y %H:%M:%S %j %I%p %%", t),
            "Friday July 26, 24 13:05:09 208 01PM %"
        );
        assert_eq!(strftime_utc("%Y-%m-%d %a", 0), "1970-01-01 Thu");
        assert_eq!(strftime_utc("%Y-%m-%d", 951_782_400), "2000-02-29");
    }
}
