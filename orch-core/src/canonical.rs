//! Canonical JSON: the one byte form of a JSON value that orch hashes, signs and exports.
//!
//! Object keys are sorted by their UTF-8 bytes, there is no insignificant white space, strings
//! escape only `"`, `\` and control characters (as `serde_json` and Python's
//! `json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False)` both do), and
//! numbers are written as `serde_json` writes them. For values made of strings, integers, booleans,
//! arrays and objects — everything orch itself writes — this is also the canonical JSON of TUF
//! and OLPC. Key order is enforced here rather than inherited from `serde_json`'s map type, so a
//! dependency switching on `serde_json/preserve_order` cannot change a hash.

use serde::Serialize;
use serde_json::Value;

/// Errors turning a value into canonical JSON.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CanonicalError {
    /// The value could not be represented as JSON.
    #[error("cannot encode as JSON: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The canonical bytes of any serializable value.
///
/// Written straight from the value's `Serialize` impl (no `serde_json::Value` in between), and
/// byte for byte what `value_to_vec(&serde_json::to_value(value)?)` gives: an object's keys are
/// sorted and, where a map repeats a key, the last value wins; non-finite floats are `null`.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CanonicalError> {
    let mut out = Vec::with_capacity(512);
    value.serialize(Writer { out: &mut out, locate: None })?;
    Ok(out)
}

/// Where one top-level member of an object sits in its canonical bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The member with the comma that separates it from a neighbour: removing these bytes
    /// leaves the canonical bytes of the object without the member.
    pub span: std::ops::Range<usize>,
    /// Its value.
    pub value: std::ops::Range<usize>,
}

/// The canonical bytes of a value, and where its top-level member `key` sits if it is an object
/// that has one. What an event's hash covers is its bytes without the `hash` member; this
/// finds both in one pass.
pub fn to_vec_locating<T: Serialize + ?Sized>(
    value: &T,
    key: &str,
) -> Result<(Vec<u8>, Option<Member>), CanonicalError> {
    let mut out = Vec::with_capacity(512);
    let mut found = None;
    value.serialize(Writer { out: &mut out, locate: Some((key, &mut found)) })?;
    Ok((out, found))
}

/// [`to_vec_locating`] into `out`, which is cleared first: for callers that encode many values
/// and keep one buffer.
pub fn write_locating<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    value: &T,
    key: &str,
) -> Result<Option<Member>, CanonicalError> {
    out.clear();
    let mut found = None;
    value.serialize(Writer { out, locate: Some((key, &mut found)) })?;
    Ok(found)
}

/// The canonical bytes of a value without its top-level member `key`.
pub fn to_vec_without<T: Serialize + ?Sized>(value: &T, key: &str) -> Result<Vec<u8>, CanonicalError> {
    let (mut out, member) = to_vec_locating(value, key)?;
    if let Some(m) = member {
        out.drain(m.span);
    }
    Ok(out)
}

/// The canonical bytes of a JSON value.
pub fn value_to_vec(v: &Value) -> Vec<u8> {
    // A `Value` always encodes: its keys are strings and its numbers finite.
    to_vec(v).expect("JSON values encode")
}

/// The canonical text of a JSON value.
pub fn value_to_string(v: &Value) -> String {
    // Only valid UTF-8 is ever written.
    String::from_utf8(value_to_vec(v)).expect("canonical JSON is UTF-8")
}

/// Where to report the position of a top-level member: its key, and the answer.
type Locate<'a> = Option<(&'a str, &'a mut Option<Member>)>;

/// A serde serializer writing canonical JSON into `out`; `locate` applies to the object it
/// writes, not to objects nested in it.
struct Writer<'a> {
    out: &'a mut Vec<u8>,
    locate: Locate<'a>,
}

impl<'a> Writer<'a> {
    fn nested(out: &'a mut Vec<u8>) -> Self {
        Writer { out, locate: None }
    }

    fn int(self, v: impl itoa::Integer) -> Result<(), serde_json::Error> {
        self.out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        Ok(())
    }

    fn float(self, v: f64) -> Result<(), serde_json::Error> {
        // serde_json's own formatting, so that floats read back from a payload keep their text.
        match serde_json::Number::from_f64(v) {
            Some(n) => self.out.extend_from_slice(n.to_string().as_bytes()),
            None => self.out.extend_from_slice(b"null"),
        }
        Ok(())
    }

    /// `{"variant":…}`: how enums' data-carrying variants are written.
    fn tagged<T: Serialize + ?Sized>(self, variant: &str, value: &T) -> Result<(), serde_json::Error> {
        self.out.push(b'{');
        write_str(self.out, variant);
        self.out.push(b':');
        value.serialize(Writer::nested(self.out))?;
        self.out.push(b'}');
        Ok(())
    }
}

fn custom(msg: &str) -> serde_json::Error {
    <serde_json::Error as serde::ser::Error>::custom(msg)
}

impl<'a> serde::Serializer for Writer<'a> {
    type Ok = ();
    type Error = serde_json::Error;
    type SerializeSeq = Array<'a>;
    type SerializeTuple = Array<'a>;
    type SerializeTupleStruct = Array<'a>;
    type SerializeTupleVariant = Array<'a>;
    type SerializeMap = Object<'a>;
    type SerializeStruct = Object<'a>;
    type SerializeStructVariant = Object<'a>;

    fn serialize_bool(self, v: bool) -> Result<(), Self::Error> {
        self.out.extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result<(), Self::Error> {
        self.int(v)
    }
    fn serialize_i16(self, v: i16) -> Result<(), Self::Error> {
        self.int(v)
    }
    fn serialize_i32(self, v: i32) -> Result<(), Self::Error> {
        self.int(v)
    }
    fn serialize_i64(self, v: i64) -> Result<(), Self::Error> {
        self.int(v)
    }
    fn serialize_i128(self, v: i128) -> Result<(), Self::Error> {
        match i64::try_from(v) {
            Ok(v) => self.int(v),
            Err(_) => Err(custom("number out of range")),
        }
    }
    fn serialize_u8(self, v: u8) -> Result<(), Self::Error> {
        self.int(v)
    }
    fn serialize_u16(self, v: u16) -> Result<(), Self::Error> {
        self.int(v)
    }
    fn serialize_u32(self, v: u32) -> Result<(), Self::Error> {
        self.int(v)
    }
    fn serialize_u64(self, v: u64) -> Result<(), Self::Error> {
        self.int(v)
    }
    fn serialize_u128(self, v: u128) -> Result<(), Self::Error> {
        match u64::try_from(v) {
            Ok(v) => self.int(v),
            Err(_) => Err(custom("number out of range")),
        }
    }
    fn serialize_f32(self, v: f32) -> Result<(), Self::Error> {
        self.float(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Result<(), Self::Error> {
        self.float(v)
    }
    fn serialize_char(self, v: char) -> Result<(), Self::Error> {
        write_str(self.out, v.encode_utf8(&mut [0; 4]));
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Result<(), Self::Error> {
        write_str(self.out, v);
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), Self::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = self.serialize_seq(Some(v.len()))?;
        for b in v {
            seq.serialize_element(b)?;
        }
        seq.end()
    }
    fn serialize_none(self) -> Result<(), Self::Error> {
        self.serialize_unit()
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Self::Error> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Self::Error> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), Self::Error> {
        self.serialize_unit()
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> Result<(), Self::Error> {
        self.serialize_str(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, value: &T) -> Result<(), Self::Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Self::Error> {
        self.tagged(variant, value)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Array<'a>, Self::Error> {
        self.out.push(b'[');
        Ok(Array { out: self.out, first: true, close: b"]" })
    }
    fn serialize_tuple(self, len: usize) -> Result<Array<'a>, Self::Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<Array<'a>, Self::Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Array<'a>, Self::Error> {
        self.out.push(b'{');
        write_str(self.out, variant);
        self.out.extend_from_slice(b":[");
        Ok(Array { out: self.out, first: true, close: b"]}" })
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Object<'a>, Self::Error> {
        Ok(Object::new(self.out, self.locate, len.unwrap_or(8), None))
    }
    fn serialize_struct(self, _: &'static str, len: usize) -> Result<Object<'a>, Self::Error> {
        Ok(Object::new(self.out, self.locate, len, None))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Object<'a>, Self::Error> {
        Ok(Object::new(self.out, None, len, Some(variant)))
    }
}

/// An array being written.
struct Array<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
    close: &'static [u8],
}

impl Array<'_> {
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), serde_json::Error> {
        if !std::mem::take(&mut self.first) {
            self.out.push(b',');
        }
        value.serialize(Writer::nested(self.out))
    }

    fn close(self) -> Result<(), serde_json::Error> {
        self.out.extend_from_slice(self.close);
        Ok(())
    }
}

impl serde::ser::SerializeSeq for Array<'_> {
    type Ok = ();
    type Error = serde_json::Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Self::Error> {
        self.element(value)
    }
    fn end(self) -> Result<(), Self::Error> {
        self.close()
    }
}

impl serde::ser::SerializeTuple for Array<'_> {
    type Ok = ();
    type Error = serde_json::Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Self::Error> {
        self.element(value)
    }
    fn end(self) -> Result<(), Self::Error> {
        self.close()
    }
}

impl serde::ser::SerializeTupleStruct for Array<'_> {
    type Ok = ();
    type Error = serde_json::Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Self::Error> {
        self.element(value)
    }
    fn end(self) -> Result<(), Self::Error> {
        self.close()
    }
}

impl serde::ser::SerializeTupleVariant for Array<'_> {
    type Ok = ();
    type Error = serde_json::Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Self::Error> {
        self.element(value)
    }
    fn end(self) -> Result<(), Self::Error> {
        self.close()
    }
}

/// An object being written. Members go straight to `out` as they come; while their keys come
/// in order (a `Value`'s map, a struct whose fields are declared sorted) that is all. A key out
/// of order makes `close` rewrite the members in key order.
struct Object<'a> {
    out: &'a mut Vec<u8>,
    locate: Locate<'a>,
    /// Set for a struct variant, written as `{"variant":{…}}`.
    variant: Option<&'static str>,
    /// Where the first member starts in `out`.
    base: usize,
    members: Vec<Written>,
    /// Whether every key so far came after the one before.
    in_order: bool,
    /// A map key waiting for its value.
    key: Option<String>,
}

/// A member as written to `out`: its key, where it starts (at its comma, if it has one), where
/// its value starts and where it ends.
struct Written {
    key: std::borrow::Cow<'static, str>,
    start: usize,
    value: usize,
    end: usize,
}

impl<'a> Object<'a> {
    fn new(out: &'a mut Vec<u8>, locate: Locate<'a>, len: usize, variant: Option<&'static str>) -> Self {
        if let Some(v) = variant {
            out.push(b'{');
            write_str(out, v);
            out.push(b':');
        }
        out.push(b'{');
        let base = out.len();
        Object { out, locate, variant, base, members: Vec::with_capacity(len.min(64)), in_order: true, key: None }
    }

    fn member<T: Serialize + ?Sized>(
        &mut self,
        key: std::borrow::Cow<'static, str>,
        value: &T,
    ) -> Result<(), serde_json::Error> {
        let start = self.out.len();
        if let Some(last) = self.members.last() {
            self.in_order &= last.key.as_bytes() < key.as_bytes();
            self.out.push(b',');
        }
        write_str(self.out, &key);
        self.out.push(b':');
        let value_start = self.out.len();
        value.serialize(Writer::nested(self.out))?;
        self.members.push(Written { key, start, value: value_start, end: self.out.len() });
        Ok(())
    }

    fn close(mut self) -> Result<(), serde_json::Error> {
        if !self.in_order {
            self.reorder();
        }
        if let Some((wanted, found)) = &mut self.locate {
            let n = self.members.len();
            if let Some(i) = self.members.iter().position(|m| m.key == *wanted) {
                let m = &self.members[i];
                // The first member takes the comma after it, any other the one before.
                let span = if i == 0 { m.start..m.end + usize::from(n > 1) } else { m.start..m.end };
                **found = Some(Member { span, value: m.value..m.end });
            }
        }
        self.out.push(b'}');
        if self.variant.is_some() {
            self.out.push(b'}');
        }
        Ok(())
    }

    /// Rewrites the members in key order; of a repeated key, the last value written stays.
    /// The sorted copy is appended after the members as written, which are then cut out.
    fn reorder(&mut self) {
        let written_end = self.out.len();
        // By key, and by position among equal keys; no allocation beyond the member list.
        let mut order: Vec<usize> = (0..self.members.len()).collect();
        order.sort_unstable_by(|&a, &b| {
            self.members[a].key.as_bytes().cmp(self.members[b].key.as_bytes()).then(a.cmp(&b))
        });
        let mut sorted: Vec<Written> = Vec::with_capacity(self.members.len());
        for i in order {
            let m = &self.members[i];
            if let Some(last) = sorted.last_mut() {
                if last.key == m.key {
                    // The later value replaces the earlier one, which was the last copied.
                    self.out.truncate(last.value);
                    self.out.extend_from_within(m.value..m.end);
                    last.end = self.out.len();
                    continue;
                }
            }
            let start = self.out.len();
            if !sorted.is_empty() {
                self.out.push(b',');
            }
            // The key as written, with its colon and value.
            let key_start = if m.start == self.base { m.start } else { m.start + 1 };
            self.out.extend_from_within(key_start..m.end);
            let value = self.out.len() - (m.end - m.value);
            sorted.push(Written { key: m.key.clone(), start, value, end: self.out.len() });
        }
        let cut = written_end - self.base;
        self.out.drain(self.base..written_end);
        for m in &mut sorted {
            m.start -= cut;
            m.value -= cut;
            m.end -= cut;
        }
        self.members = sorted;
    }
}

impl serde::ser::SerializeMap for Object<'_> {
    type Ok = ();
    type Error = serde_json::Error;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Self::Error> {
        self.key = Some(key.serialize(KeyWriter)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Self::Error> {
        let key = self.key.take().ok_or_else(|| custom("map value without a key"))?;
        self.member(key.into(), value)
    }
    fn end(self) -> Result<(), Self::Error> {
        self.close()
    }
}

impl serde::ser::SerializeStruct for Object<'_> {
    type Ok = ();
    type Error = serde_json::Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), Self::Error> {
        self.member(key.into(), value)
    }
    fn end(self) -> Result<(), Self::Error> {
        self.close()
    }
}

impl serde::ser::SerializeStructVariant for Object<'_> {
    type Ok = ();
    type Error = serde_json::Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), Self::Error> {
        self.member(key.into(), value)
    }
    fn end(self) -> Result<(), Self::Error> {
        self.close()
    }
}

/// Map keys become strings as `serde_json::to_value` makes them: strings and characters as they
/// are, integers and booleans as their text; anything else is an error.
struct KeyWriter;

fn key_error() -> serde_json::Error {
    custom("key must be a string")
}

impl serde::Serializer for KeyWriter {
    type Ok = String;
    type Error = serde_json::Error;
    type SerializeSeq = serde::ser::Impossible<String, serde_json::Error>;
    type SerializeTuple = serde::ser::Impossible<String, serde_json::Error>;
    type SerializeTupleStruct = serde::ser::Impossible<String, serde_json::Error>;
    type SerializeTupleVariant = serde::ser::Impossible<String, serde_json::Error>;
    type SerializeMap = serde::ser::Impossible<String, serde_json::Error>;
    type SerializeStruct = serde::ser::Impossible<String, serde_json::Error>;
    type SerializeStructVariant = serde::ser::Impossible<String, serde_json::Error>;

    fn serialize_bool(self, v: bool) -> Result<String, Self::Error> {
        Ok(v.to_string())
    }
    fn serialize_i8(self, v: i8) -> Result<String, Self::Error> {
        Ok(v.to_string())
    }
    fn serialize_i16(self, v: i16) -> Result<String, Self::Error> {
        Ok(v.to_string())
    }
    fn serialize_i32(self, v: i32) -> Result<String, Self::Error> {
        Ok(v.to_string())
    }
    fn serialize_i64(self, v: i64) -> Result<String, Self::Error> {
        Ok(v.to_string())
    }
    fn serialize_u8(self, v: u8) -> Result<String, Self::Error> {
        Ok(v.to_string())
    }
    fn serialize_u16(self, v: u16) -> Result<String, Self::Error> {
        Ok(v.to_string())
    }
    fn serialize_u32(self, v: u32) -> Result<String, Self::Error> {
        Ok(v.to_string())
    }
    fn serialize_u64(self, v: u64) -> Result<String, Self::Error> {
        Ok(v.to_string())
    }
    fn serialize_f32(self, _: f32) -> Result<String, Self::Error> {
        Err(key_error())
    }
    fn serialize_f64(self, _: f64) -> Result<String, Self::Error> {
        Err(key_error())
    }
    fn serialize_char(self, v: char) -> Result<String, Self::Error> {
        Ok(v.to_string())
    }
    fn serialize_str(self, v: &str) -> Result<String, Self::Error> {
        Ok(v.to_owned())
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<String, Self::Error> {
        Err(key_error())
    }
    fn serialize_none(self) -> Result<String, Self::Error> {
        Err(key_error())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<String, Self::Error> {
        Err(key_error())
    }
    fn serialize_unit(self) -> Result<String, Self::Error> {
        Err(key_error())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<String, Self::Error> {
        Err(key_error())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> Result<String, Self::Error> {
        Ok(variant.to_owned())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<String, Self::Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<String, Self::Error> {
        Err(key_error())
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Self::Error> {
        Err(key_error())
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Self::Error> {
        Err(key_error())
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeTupleStruct, Self::Error> {
        Err(key_error())
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, Self::Error> {
        Err(key_error())
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Self::Error> {
        Err(key_error())
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct, Self::Error> {
        Err(key_error())
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, Self::Error> {
        Err(key_error())
    }
}

/// The bytes a JSON string must escape: control characters, `"` and `\\`.
const ESCAPED: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = true;
        b += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Whether any of eight bytes is one that [`ESCAPED`] names (a word-at-a-time test: a byte
/// below 0x20, or equal to `"` or `\\`, leaves its high bit set in the result).
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    (below_space | zero_byte(w ^ (ONES * u64::from(b'"'))) | zero_byte(w ^ (ONES * u64::from(b'\\')))) != 0
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // Skip the words that need no escape, then look at bytes one by one.
    let clean = bytes
        .chunks_exact(8)
        .take_while(|c| !word_needs_escape(u64::from_le_bytes((*c).try_into().expect("eight bytes"))))
        .count()
        * 8;
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate().skip(clean) {
        if !ESCAPED[usize::from(b)] {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_and_strips_space() {
        let v = json!({"b": 1, "a": {"z": [true, null], "é": "x", "A": -3}});
        assert_eq!(value_to_string(&v), r#"{"a":{"A":-3,"z":[true,null],"é":"x"},"b":1}"#);
    }

    #[test]
    fn escapes_like_python_json_dumps() {
        let v = json!("q\"\\\n\u{1}\u{7f}/ü");
        assert_eq!(value_to_string(&v), "\"q\\\"\\\\\\n\\u0001\u{7f}/ü\"");
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            ".*".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".{0,8}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// The reference the direct writer is held to: canonical JSON written from a
    /// `serde_json::Value` tree.
    fn reference(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        write_value(&mut out, v);
        out
    }

    fn write_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::Null => out.extend_from_slice(b"null"),
            Value::Bool(true) => out.extend_from_slice(b"true"),
            Value::Bool(false) => out.extend_from_slice(b"false"),
            Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
            Value::String(s) => write_str(out, s),
            Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_value(out, item);
                }
                out.push(b']');
            }
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                out.push(b'{');
                for (i, (k, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_str(out, k);
                    out.push(b':');
                    write_value(out, item);
                }
                out.push(b'}');
            }
        }
    }

    /// What `to_vec` must equal: the value through `serde_json::Value`.
    fn via_value<T: Serialize>(v: &T) -> Vec<u8> {
        reference(&serde_json::to_value(v).unwrap())
    }

    #[derive(Serialize)]
    enum Shape {
        Unit,
        Newtype(u8),
        Tuple(i32, String),
        Struct { z: bool, a: Option<char> },
    }

    #[derive(Serialize)]
    #[serde(tag = "type", content = "data")]
    enum Adjacent {
        Plain,
        Carrying { b: i64, a: Vec<Shape> },
    }

    #[derive(Serialize)]
    struct Everything {
        zeta: Vec<Shape>,
        alpha: Adjacent,
        other: Adjacent,
        #[serde(skip_serializing_if = "Option::is_none")]
        skipped: Option<u8>,
        none: Option<u8>,
        ints: std::collections::BTreeMap<u64, i16>,
        #[serde(with = "serde_bytes_as_seq")]
        bytes: Vec<u8>,
        unit: (),
        pair: (u8, &'static str),
        floats: [f64; 4],
        small: f32,
        big: u128,
        #[serde(flatten)]
        rest: std::collections::BTreeMap<String, Value>,
    }

    mod serde_bytes_as_seq {
        pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(v)
        }
    }

    #[test]
    fn writes_every_serde_shape_as_the_value_path_does() {
        let x = Everything {
            zeta: vec![Shape::Unit, Shape::Newtype(7), Shape::Tuple(-1, "t".into())],
            alpha: Adjacent::Carrying { b: -9, a: vec![Shape::Struct { z: true, a: Some('é') }] },
            other: Adjacent::Plain,
            skipped: None,
            none: None,
            ints: [(10, -1), (2, 3)].into_iter().collect(),
            bytes: vec![0, 255],
            unit: (),
            pair: (1, "\u{1}\n"),
            floats: [1.5, -0.0, 1e300, f64::NAN],
            small: 0.1,
            big: 18_446_744_073_709_551_615,
            rest: [("mid".to_string(), json!({"y": 1, "x": [2.25, "s"]}))].into_iter().collect(),
        };
        let got = to_vec(&x).unwrap();
        assert_eq!(String::from_utf8(got.clone()).unwrap(), String::from_utf8(via_value(&x)).unwrap());
        assert!(to_vec(&(u64::MAX as u128 + 1)).is_err(), "beyond JSON's integers, as serde_json");
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value() {
        #[derive(Serialize)]
        struct Twice {
            a: u8,
            #[serde(flatten)]
            more: std::collections::BTreeMap<String, u8>,
        }
        let x = Twice { a: 1, more: [("a".to_string(), 2)].into_iter().collect() };
        assert_eq!(to_vec(&x).unwrap(), via_value(&x));
        assert_eq!(to_vec(&x).unwrap(), br#"{"a":2}"#);
    }

    #[test]
    fn locates_only_top_level_members() {
        let v = json!({"hash": 1, "b": {"hash": 2}});
        let (bytes, m) = to_vec_locating(&v, "hash").unwrap();
        assert_eq!(&bytes[m.unwrap().value], b"1");
        assert_eq!(to_vec_without(&v, "hash").unwrap(), br#"{"b":{"hash":2}}"#);
        for (v, without) in [
            (json!({"a": 1, "hash": "h"}), json!({"a": 1})),
            (json!({"hash": "h", "z": 1}), json!({"z": 1})),
            (json!({"a": 1, "hash": "h", "z": [1]}), json!({"a": 1, "z": [1]})),
            (json!({"hash": "h"}), json!({})),
            (json!({"a": 1}), json!({"a": 1})),
        ] {
            assert_eq!(to_vec_without(&v, "hash").unwrap(), to_vec(&without).unwrap(), "{v}");
        }
        assert_eq!(to_vec_locating(&json!([{"hash": 1}]), "hash").unwrap().1, None);
    }

    fn arb_number() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            (-1e6f64..1e6).prop_map(|f| json!(f)),
        ]
    }

    proptest! {
        /// The word-at-a-time test finds exactly the bytes that need an escape.
        #[test]
        fn word_test_matches_the_table(word in any::<[u8; 8]>(), special in any::<[bool; 8]>(), pick in any::<[u8; 8]>()) {
            let mut w = word;
            for i in 0..8 {
                if special[i] {
                    w[i] = [b'"', b'\\', 0x1f, 0, b' ', b'!', 0x7f, 0x80][usize::from(pick[i] % 8)];
                }
            }
            prop_assert_eq!(word_needs_escape(u64::from_le_bytes(w)), w.iter().any(|&b| ESCAPED[usize::from(b)]), "{:?}", w);
        }

        /// The direct writer and the `Value` path agree on any JSON, floats included.
        #[test]
        fn direct_writer_matches_value_path(v in arb_json(), n in arb_number()) {
            prop_assert_eq!(to_vec(&v).unwrap(), reference(&v));
            let wrapped = json!({"n": n, "v": v});
            prop_assert_eq!(to_vec(&wrapped).unwrap(), reference(&wrapped));
        }

        /// Canonical bytes parse back to the same value, and re-encoding them is a fixed point.
        #[test]
        fn canonical_round_trip(v in arb_json()) {
            let bytes = value_to_vec(&v);
            let back: Value = serde_json::from_slice(&bytes).unwrap();
            prop_assert_eq!(&back, &v);
            prop_assert_eq!(value_to_vec(&back), bytes);
        }
    }
}
