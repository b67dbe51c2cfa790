//! Tool calls found inside an execution's payloads, so each one can become its own Akto record.
//!
//! The payloads are parsed once, leniently and shallowly: a small set of known keys is read
//! (`choices`, `messages`, `output`, `input`, and inside items `role`, `type`, `tool_calls`,
//! `function`, `name`, `arguments`, `call_id`, `tool_call_id`, `content`, `output`), every
//! other value is skipped without being built, and a value of an unexpected type is ignored
//! instead of failing the whole parse.
//!
//! Formats understood (see `shared/reference/databricks-api.md`):
//! - chat completions: response `choices[].message.tool_calls[]`;
//! - ChatAgent: response `messages[].tool_calls[]` with `messages[]` of `role: tool` holding the
//!   results by `tool_call_id`;
//! - ResponsesAgent: response `output[]` items `function_call` (`call_id`, `name`, `arguments`)
//!   and `function_call_output` (`call_id`, `output`).
//! - Streamed responses logged as the list of their chunks or events (a top-level JSON array):
//!   chat completion chunks (`choices[].delta.tool_calls[]`, fragments joined by `index`),
//!   ChatAgent chunks (`delta`, a message), ResponsesAgent stream events (the `item` of
//!   `response.output_item.done`).
//! - A pyfunc model's `predictions` (an object or a list) holding any of these.
//!
//! Calls come from the response (what this execution did). Their outputs are looked up by call
//! id in the response first and then in the request's history (`messages[]` of `role: tool`,
//! `input[]` items `function_call_output`); the request is parsed only when an output is missing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::json::JsonString;

/// One tool call of an execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ToolCall {
    /// The call id (`id`, `call_id`); `None` when the payload had none.
    pub id: Option<String>,
    /// Tool (function) name; `unknown` when missing.
    pub name: String,
    /// Arguments as sent (usually a JSON string).
    pub arguments: String,
    /// The matched output, if found.
    pub output: Option<String>,
}

/// Result of scanning the payloads.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub calls: Vec<ToolCall>,
    /// `Some(false)` when the response looked like JSON but did not parse.
    pub response_parsed: Option<bool>,
    /// `Some(false)` when the request was parsed (to find outputs) and did not parse.
    pub request_parsed: Option<bool>,
}

/// Does `s` start like a JSON object, or an array (a streamed response's chunks)?
fn looks_like_object(s: &str) -> bool {
    s.trim_start().starts_with(['{', '['])
}

/// Find the tool calls of an execution. Never fails: unparsable payloads yield no calls.
///
/// The request is given as its literal: it is decoded only when an output is missing.
pub(crate) fn scan(request: Option<&JsonString>, response: Option<&str>) -> Scan {
    let mut out = Scan::default();
    let Some(resp) = response.filter(|r| looks_like_object(r)) else {
        return out;
    };
    let docs: Docs = match serde_json::from_str(resp) {
        Ok(d) => d,
        Err(_) => {
            out.response_parsed = Some(false);
            return out;
        }
    };
    out.response_parsed = Some(true);

    let mut calls: Vec<ToolCall> = Vec::new();
    let mut outputs = Outputs::new();
    let mut streamed = Fragments::default();
    for doc in docs.0 {
        collect(doc, &mut calls, &mut outputs, &mut streamed);
    }
    streamed.finish(&mut calls);
    if calls.is_empty() {
        return out;
    }

    // The same call listed twice (same id, name and arguments: a message and its stream form,
    // say) is one call, unless the response holds an output for each listing (a call made
    // again). Calls that share an id but differ are distinct (an agent may number its calls
    // `call_0` at every step): each takes the outputs given for that id in order.
    let mut listed: HashMap<String, usize> = HashMap::new();
    for id in calls.iter().filter_map(|c| c.id.clone()) {
        *listed.entry(id).or_default() += 1;
    }
    let mut seen: HashSet<(String, String, String)> = HashSet::new();
    calls.retain(|c| match &c.id {
        Some(id) if outputs.get(id).map_or(0, VecDeque::len) < listed[id] => {
            seen.insert((id.clone(), c.name.clone(), c.arguments.clone()))
        }
        _ => true,
    });
    for c in &mut calls {
        if let Some(id) = &c.id {
            c.output = outputs.get_mut(id).and_then(VecDeque::pop_front);
        }
    }

    // Calls still without an output: the request's history may hold it (a client that ran the
    // tool). Only an output that is alone for its id there, for the only such call, and whose
    // call the history does not show as another one (an id reused by a later step).
    let waiting: HashMap<String, usize> = calls
        .iter()
        .filter(|c| c.output.is_none())
        .filter_map(|c| c.id.clone())
        .fold(HashMap::new(), |mut m, id| {
            *m.entry(id).or_default() += 1;
            m
        });
    if !waiting.is_empty() {
        if let Some(req) = request.filter(|r| r.first_non_whitespace() == Some('{')) {
            match serde_json::from_str::<Doc>(&req.text()) {
                Ok(doc) => {
                    out.request_parsed = Some(true);
                    // Calls in the request history are not this execution's: they only tell
                    // which call an output there belongs to.
                    let mut history = Vec::new();
                    let mut req_outputs = Outputs::new();
                    collect(
                        doc,
                        &mut history,
                        &mut req_outputs,
                        &mut Fragments::default(),
                    );
                    for c in calls.iter_mut().filter(|c| c.output.is_none()) {
                        let Some(id) = c.id.as_deref() else {
                            continue;
                        };
                        let other_call = history.iter().any(|h| {
                            h.id.as_deref() == Some(id)
                                && (&h.name, &h.arguments) != (&c.name, &c.arguments)
                        });
                        let alone = req_outputs.get(id).filter(|q| q.len() == 1);
                        if let (false, Some(q), Some(1)) = (other_call, alone, waiting.get(id)) {
                            c.output = q.front().cloned();
                        }
                    }
                }
                Err(_) => out.request_parsed = Some(false),
            }
        }
    }
    out.calls = calls;
    out
}

/// The outputs of a payload by call id, in the order given.
type Outputs = HashMap<String, VecDeque<String>>;

fn collect(doc: Doc, calls: &mut Vec<ToolCall>, outputs: &mut Outputs, streamed: &mut Fragments) {
    for choice in doc.choices.0 {
        if let Some(msg) = choice.message {
            item(*msg, calls, outputs);
        }
        if let Some(delta) = choice.delta {
            streamed.add(choice.index.0.clone(), *delta);
        }
    }
    for it in doc
        .messages
        .0
        .into_iter()
        .chain(doc.output.0)
        .chain(doc.input.0)
    {
        item(it, calls, outputs);
    }
    // A ChatAgent chunk: its delta is a whole message (tool calls complete, or a tool result).
    if let Some(delta) = doc.delta {
        item(*delta, calls, outputs);
    }
    // A ResponsesAgent stream event: the item once done (`added` has no arguments yet).
    if doc.kind.0.as_deref() == Some("response.output_item.done") {
        if let Some(it) = doc.item {
            item(*it, calls, outputs);
        }
    }
    for p in doc.predictions.0 {
        collect(p, calls, outputs, streamed);
    }
}

/// The tool calls of chat completion chunks (`choices[].delta.tool_calls[]`): the first fragment
/// of a call carries its `index`, `id` and name, the next ones (same choice and `index`) more of
/// its arguments.
#[derive(Default)]
struct Fragments {
    /// `((choice index, tool call index), call)` in the order the calls started.
    calls: Vec<((String, Option<String>), ToolCall)>,
}

impl Fragments {
    fn add(&mut self, choice: Option<String>, delta: Item) {
        let choice = choice.unwrap_or_default();
        for tc in delta.tool_calls.0 {
            let Item {
                id,
                name,
                arguments,
                function,
                index,
                ..
            } = tc;
            let (fname, fargs) = match function {
                Some(f) => (f.name.0, f.arguments.0),
                None => (None, None),
            };
            let (id, name, args) = (nonblank(id.0), fname.or(name.0), fargs.or(arguments.0));
            let name = name.filter(|n| !n.trim().is_empty());
            // The open call of this choice at this index (without an index: its latest call).
            let open = self
                .calls
                .iter_mut()
                .rev()
                .find(|((c, i), _)| *c == choice && (index.0.is_none() || *i == index.0))
                .map(|(_, call)| call)
                // Another id starts another call; so does another name when the call has one
                // (a fragment may repeat its call's name; servers that give every call index 0
                // without an id still tell them apart by name).
                .filter(|call| match &id {
                    Some(id) => call.id.as_ref().is_none_or(|own| own == id),
                    None => {
                        name.is_none()
                            || call.name.is_empty()
                            || (index.0.is_some() && name.as_deref() == Some(call.name.as_str()))
                    }
                });
            match open {
                Some(call) => {
                    call.arguments.push_str(args.as_deref().unwrap_or_default());
                    if call.name.is_empty() {
                        call.name = name.unwrap_or_default();
                    }
                    if call.id.is_none() {
                        call.id = id;
                    }
                }
                None => self.calls.push((
                    (choice.clone(), index.0),
                    ToolCall {
                        id,
                        name: name.unwrap_or_default(),
                        arguments: args.unwrap_or_default(),
                        output: None,
                    },
                )),
            }
        }
    }

    /// The joined calls, after the others.
    fn finish(self, calls: &mut Vec<ToolCall>) {
        for (_, c) in self.calls {
            let name = (!c.name.trim().is_empty()).then_some(c.name);
            let arguments = (!c.arguments.is_empty()).then_some(c.arguments);
            push_call(calls, c.id, name, arguments);
        }
    }
}

/// Read one message / output item.
fn item(it: Item, calls: &mut Vec<ToolCall>, outputs: &mut Outputs) {
    let Item {
        role,
        kind,
        name,
        id,
        call_id,
        tool_call_id,
        arguments,
        output,
        content,
        tool_calls,
        ..
    } = it;
    for tc in tool_calls.0 {
        let Item {
            id,
            name,
            arguments,
            function,
            call_id,
            ..
        } = tc;
        let (fname, fargs) = match function {
            Some(f) => (f.name.0, f.arguments.0),
            None => (None, None),
        };
        push_call(
            calls,
            nonblank(id.0).or(nonblank(call_id.0)),
            fname.or(name.0),
            fargs.or(arguments.0),
        );
    }
    match kind.0.as_deref() {
        Some("function_call") => push_call(
            calls,
            nonblank(call_id.0).or(nonblank(id.0)),
            name.0,
            arguments.0,
        ),
        Some("function_call_output") => {
            if let (Some(cid), Some(o)) = (nonblank(call_id.0), output.0) {
                outputs.entry(cid).or_default().push_back(o);
            }
        }
        _ => {
            if role.0.as_deref() == Some("tool") {
                if let (Some(cid), Some(c)) = (nonblank(tool_call_id.0), content.0) {
                    outputs.entry(cid).or_default().push_back(c);
                }
            }
        }
    }
}

/// A call id that says something: a blank one (`"id": ""`) is no id, so such calls are kept
/// apart by position and never matched to each other's outputs.
fn nonblank(id: Option<String>) -> Option<String> {
    id.filter(|i| !i.trim().is_empty())
}

/// Record a call unless it carries nothing at all (not an object, or an empty one). A missing
/// or blank name becomes `unknown`.
fn push_call(
    calls: &mut Vec<ToolCall>,
    id: Option<String>,
    name: Option<String>,
    arguments: Option<String>,
) {
    if id.is_none() && name.is_none() && arguments.is_none() {
        return;
    }
    let name = name
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    calls.push(ToolCall {
        id,
        name,
        arguments: arguments.unwrap_or_default(),
        output: None,
    });
}

/// Does a tool's output report an error? Heuristic: text starting with the word `error`,
/// `exception` or `failed`, a Python traceback, or a JSON object with a non-null `error`,
/// `is_error`/`isError: true`, or `status` of `error`/`failed`/`failure`.
pub(crate) fn output_says_error(output: &str) -> bool {
    let t = output.trim_start();
    let head: String = t.chars().take(16).collect::<String>().to_ascii_lowercase();
    let word_prefix = |w: &str| {
        head.strip_prefix(w)
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_alphabetic()))
    };
    if word_prefix("error") || word_prefix("exception") || word_prefix("failed") {
        return true;
    }
    if t.starts_with('{') {
        if let Ok(o) = serde_json::from_str::<ErrorProbe>(t) {
            return o.error || o.status_error;
        }
    }
    t.contains("Traceback (most recent call last)")
}

// ---------------------------------------------------------------------------------------------
// Lenient shallow parsing.

/// The visits of a lenient visitor for every scalar: each gives `$value` (a value of an
/// unexpected type is ignored instead of failing the whole parse).
macro_rules! skip_scalars {
    ($ty:ty, $value:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<$ty, E> {
            Ok($value)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<$ty, E> {
            Ok($value)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<$ty, E> {
            Ok($value)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<$ty, E> {
            Ok($value)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<$ty, E> {
            Ok($value)
        }
        fn visit_unit<E: de::Error>(self) -> Result<$ty, E> {
            Ok($value)
        }
        fn visit_none<E: de::Error>(self) -> Result<$ty, E> {
            Ok($value)
        }
    };
}

/// A scalar or JSON value kept as text: strings verbatim, other values re-serialized, null absent.
#[derive(Debug, Default)]
struct Text(Option<String>);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Text(match Value::deserialize(d)? {
            Value::Null => None,
            Value::String(s) => Some(s),
            other => Some(other.to_string()),
        }))
    }
}

/// A short string field (`role`, `type`): strings kept, anything else skipped.
#[derive(Debug, Default)]
struct Word(Option<String>);

impl<'de> Deserialize<'de> for Word {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Word;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Word, E> {
                Ok(Word(Some(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Word, E> {
                Ok(Word(Some(v)))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Word, E> {
                Ok(Word(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Word, E> {
                Ok(Word(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Word, E> {
                Ok(Word(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Word, E> {
                Ok(Word(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Word, E> {
                Ok(Word(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Word, E> {
                Ok(Word(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Word, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Word(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Word, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Word(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// A list of items; any non-array value is skipped and yields an empty list.
#[derive(Debug, Default)]
struct Items(Vec<Item>);

impl<'de> Deserialize<'de> for Items {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Items;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            skip_scalars!(Items, Items::default());
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Items, A::Error> {
                let mut v = Vec::new();
                while let Some(it) = seq.next_element::<Item>()? {
                    v.push(it);
                }
                Ok(Items(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Items, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Items::default())
            }
        }
        d.deserialize_any(V)
    }
}

/// The keys read at the top level of a payload (or of a streamed response's chunk or event).
#[derive(Debug, Default)]
struct Doc {
    choices: Items,
    messages: Items,
    output: Items,
    input: Items,
    /// A stream event's `type`.
    kind: Word,
    /// A ChatAgent chunk's message.
    delta: Option<Box<Item>>,
    /// A ResponsesAgent stream event's item.
    item: Option<Box<Item>>,
    /// A pyfunc model's output.
    predictions: Docs,
}

/// A payload's documents: the object itself, or each object of an array, nested arrays
/// flattened (a streamed response's chunks, a pyfunc model's `predictions`); anything else is no
/// document.
#[derive(Debug, Default)]
struct Docs(Vec<Doc>);

/// The keys read inside a message, choice, output item or tool call.
#[derive(Debug, Default)]
struct Item {
    role: Word,
    kind: Word,
    name: Text,
    id: Text,
    call_id: Text,
    tool_call_id: Text,
    arguments: Text,
    output: Text,
    content: Text,
    function: Option<Box<Item>>,
    message: Option<Box<Item>>,
    /// A chat completion chunk's `choices[].delta`.
    delta: Option<Box<Item>>,
    /// A streamed tool call fragment's position.
    index: Text,
    tool_calls: Items,
}

/// Known keys; everything else is `Other` and skipped.
enum Key {
    Choices,
    Messages,
    Output,
    Input,
    Role,
    Type,
    Name,
    Id,
    CallId,
    ToolCallId,
    Arguments,
    Content,
    Function,
    Message,
    ToolCalls,
    Delta,
    Item,
    Predictions,
    Index,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(match v {
                    "choices" => Key::Choices,
                    "messages" => Key::Messages,
                    "output" => Key::Output,
                    "input" => Key::Input,
                    "role" => Key::Role,
                    "type" => Key::Type,
                    "name" => Key::Name,
                    "id" => Key::Id,
                    "call_id" => Key::CallId,
                    "tool_call_id" => Key::ToolCallId,
                    "arguments" => Key::Arguments,
                    "content" => Key::Content,
                    "function" => Key::Function,
                    "message" => Key::Message,
                    "tool_calls" => Key::ToolCalls,
                    "delta" => Key::Delta,
                    "item" => Key::Item,
                    "predictions" => Key::Predictions,
                    "index" => Key::Index,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

impl<'de> Deserialize<'de> for Doc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Doc;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Doc, A::Error> {
                let mut doc = Doc::default();
                while let Some(k) = map.next_key::<Key>()? {
                    match k {
                        Key::Choices => doc.choices = map.next_value()?,
                        Key::Messages => doc.messages = map.next_value()?,
                        Key::Output => doc.output = map.next_value()?,
                        Key::Input => doc.input = map.next_value()?,
                        Key::Type => doc.kind = map.next_value()?,
                        Key::Delta => doc.delta = Some(Box::new(map.next_value()?)),
                        Key::Item => doc.item = Some(Box::new(map.next_value()?)),
                        Key::Predictions => doc.predictions = map.next_value()?,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(doc)
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for Docs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DocsVisitor;
        impl<'de> Visitor<'de> for DocsVisitor {
            type Value = Docs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            skip_scalars!(Docs, Docs::default());
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Docs, A::Error> {
                let mut v = Vec::new();
                while let Some(Docs(d)) = seq.next_element::<Docs>()? {
                    v.extend(d);
                }
                Ok(Docs(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Docs, A::Error> {
                let doc = Doc::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Docs(vec![doc]))
            }
        }
        d.deserialize_any(DocsVisitor)
    }
}

/// Lazily skipped content: the (possibly large) `content` of a message is only kept when the
/// message may be a tool result (its `role` is `tool` or not yet known).
impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Item;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            skip_scalars!(Item, Item::default());
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Item::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item, A::Error> {
                let mut it = Item::default();
                while let Some(k) = map.next_key::<Key>()? {
                    match k {
                        Key::Role => it.role = map.next_value()?,
                        Key::Type => it.kind = map.next_value()?,
                        Key::Name => it.name = map.next_value()?,
                        Key::Id => it.id = map.next_value()?,
                        Key::CallId => it.call_id = map.next_value()?,
                        Key::ToolCallId => it.tool_call_id = map.next_value()?,
                        Key::Arguments => it.arguments = map.next_value()?,
                        Key::Output => it.output = map.next_value()?,
                        Key::Content => {
                            let maybe_tool = it.role.0.as_deref().is_none_or(|r| r == "tool");
                            if maybe_tool {
                                it.content = map.next_value()?;
                            } else {
                                map.next_value::<IgnoredAny>()?;
                            }
                        }
                        Key::Function => it.function = Some(Box::new(map.next_value()?)),
                        Key::Message => it.message = Some(Box::new(map.next_value()?)),
                        Key::ToolCalls => it.tool_calls = map.next_value()?,
                        Key::Delta => it.delta = Some(Box::new(map.next_value()?)),
                        Key::Index => it.index = map.next_value()?,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(it)
            }
        }
        d.deserialize_any(V)
    }
}

/// Top-level keys of a tool output that signal an error.
#[derive(Debug, Default)]
struct ErrorProbe {
    error: bool,
    status_error: bool,
}

impl<'de> Deserialize<'de> for ErrorProbe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ErrorProbe;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ErrorProbe, A::Error> {
                let mut p = ErrorProbe::default();
                while let Some(k) = map.next_key::<String>()? {
                    match k.as_str() {
                        "error" | "errors" => {
                            let v: Value = map.next_value()?;
                            p.error |= !matches!(v, Value::Null | Value::Bool(false))
                                && v != Value::String(String::new())
                                && v != Value::Array(Vec::new());
                        }
                        "is_error" | "isError" => {
                            p.error |= map.next_value::<Value>()? == Value::Bool(true);
                        }
                        "status" => {
                            let v: Word = map.next_value()?;
                            p.status_error |= v.0.is_some_and(|s| {
                                matches!(
                                    s.to_ascii_lowercase().as_str(),
                                    "error" | "failed" | "failure"
                                )
                            });
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(p)
            }
        }
        d.deserialize_map(V)
    }
}
