//! Contract ABIs, with alloy's dynamic ABI support: encode a call from a JSON ABI, a function
//! name and JSON arguments; decode calldata and revert data back into something a human can
//! read. No IO. Every input problem is an [`AbiError`] naming the request field to blame
//! (`contract_abi`, `function_name`, `function_args[i]`), turned into a 400 at the HTTP edge.

use alloy::dyn_abi::{DynSolType, DynSolValue, JsonAbiExt, Specifier};
use alloy::json_abi::{Function, JsonAbi};
use alloy::primitives::{I256, U256};
use alloy::sol_types::{Panic, Revert, SolError};
use serde_json::Value;

use crate::chain::{from_alloy, to_alloy};

/// Items (arguments, array elements) shown before a decoded call is abbreviated.
const MAX_SHOWN_ITEMS: usize = 8;
/// Bytes of a `bytes` value shown before it is abbreviated.
const MAX_SHOWN_BYTES: usize = 32;
/// Characters of a `string` value shown before it is abbreviated.
const MAX_SHOWN_CHARS: usize = 64;

/// A request field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AbiError {
    pub field: String,
    pub message: String,
}

impl AbiError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A parsed contract ABI.
#[derive(Debug, Clone)]
pub struct ContractAbi(JsonAbi);

impl ContractAbi {
    /// `contract_abi` as clients send it: a JSON ABI array, a string holding one (web3.py
    /// style), or a compiled artifact object with an `abi` key.
    pub fn parse(value: &Value) -> Result<Self, AbiError> {
        let invalid = |why: String| AbiError::new("contract_abi", why);
        let parsed = match value {
            Value::String(text) => serde_json::from_str(text)
                .map_err(|e| invalid(format!("contract_abi is not valid JSON: {e}")))?,
            other => other.clone(),
        };
        let items = match parsed {
            Value::Object(mut artifact) if artifact.contains_key("abi") => {
                artifact.remove("abi").unwrap_or_default()
            }
            other => other,
        };
        if !items.is_array() {
            return Err(invalid(
                "contract_abi must be a JSON ABI array (or a string containing one)".into(),
            ));
        }
        serde_json::from_value(items)
            .map(Self)
            .map_err(|e| invalid(format!("contract_abi is not a valid ABI: {e}")))
    }

    /// The function `name` designates among those taking `arg_count` arguments. `name` is a
    /// plain name, or a full signature such as `transfer(address,uint256)` to pick one of
    /// several overloads.
    pub fn function(&self, name: &str, arg_count: usize) -> Result<&Function, AbiError> {
        let name = name.trim();
        let candidates: Vec<&Function> = if name.contains('(') {
            let wanted: String = name.chars().filter(|c| !c.is_whitespace()).collect();
            self.0
                .functions()
                .filter(|f| f.signature() == wanted)
                .collect()
        } else {
            self.0
                .function(name)
                .map(|fs| fs.iter().collect())
                .unwrap_or_default()
        };
        if candidates.is_empty() {
            let mut known: Vec<String> = self.0.functions().map(Function::signature).collect();
            known.truncate(MAX_SHOWN_ITEMS);
            let known = if known.is_empty() {
                "it declares no functions".to_owned()
            } else {
                format!("it has {}", known.join(", "))
            };
            return Err(AbiError::new(
                "function_name",
                format!("contract_abi has no function {name:?} ({known})"),
            ));
        }
        let signatures = |fs: &[&Function]| {
            fs.iter()
                .map(|f| f.signature())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let matching: Vec<&Function> = candidates
            .iter()
            .copied()
            .filter(|f| f.inputs.len() == arg_count)
            .collect();
        match matching.as_slice() {
            [one] => Ok(one),
            [] => Err(AbiError::new(
                "function_args",
                match candidates.as_slice() {
                    [only] => format!(
                        "{} takes {} argument{}, got {arg_count}",
                        only.signature(),
                        only.inputs.len(),
                        if only.inputs.len() == 1 { "" } else { "s" }
                    ),
                    _ => format!(
                        "no overload of {name} takes {arg_count} arguments (there are {})",
                        signatures(&candidates)
                    ),
                },
            )),
            several => Err(AbiError::new(
                "function_name",
                format!(
                    "{name} is overloaded ({}): give the full signature, e.g. {:?}",
                    signatures(several),
                    several[0].signature()
                ),
            )),
        }
    }

    /// A custom error this ABI declares, decoded from revert data: `Unauthorized(caller: 0x…)`.
    pub fn describe_error(&self, data: &[u8]) -> Option<String> {
        let selector = data.get(..4)?;
        let error = self
            .0
            .errors()
            .find(|e| e.selector().as_slice() == selector)?;
        let values = error.abi_decode_input(&data[4..]).ok()?;
        let names = error.inputs.iter().map(|p| p.name());
        Some(format!(
            "{}({})",
            error.name,
            format_args_list(names, &values)
        ))
    }
}

/// ABI-encode a call of `function` (selector included) from JSON arguments.
pub fn encode_call(function: &Function, args: &[Value]) -> Result<Vec<u8>, AbiError> {
    if args.len() != function.inputs.len() {
        return Err(AbiError::new(
            "function_args",
            format!(
                "{} takes {} arguments, got {}",
                function.signature(),
                function.inputs.len(),
                args.len()
            ),
        ));
    }
    let mut values = Vec::with_capacity(args.len());
    for (i, (param, arg)) in function.inputs.iter().zip(args).enumerate() {
        let field = format!("function_args[{i}]");
        let ty = param.resolve().map_err(|e| {
            AbiError::new(
                "contract_abi",
                format!("contract_abi: parameter {i} of {}: {e}", function.name),
            )
        })?;
        values.push(json_to_value(&ty, arg, &field)?);
    }
    function
        .abi_encode_input(&values)
        .map_err(|e| AbiError::new("function_args", format!("function_args: {e}")))
}

fn json_to_value(ty: &DynSolType, json: &Value, field: &str) -> Result<DynSolValue, AbiError> {
    let wrong = |what: &str| AbiError::new(field, format!("{field} ({ty}) must be {what}"));
    let text = || json.as_str().ok_or_else(|| wrong("a string"));
    match ty {
        DynSolType::Address => {
            let address: aggregates::Address = text()?
                .parse()
                .map_err(|e| AbiError::new(field, format!("{field} (address): {e}")))?;
            Ok(DynSolValue::Address(to_alloy(&address)))
        }
        DynSolType::Bool => json
            .as_bool()
            .map(DynSolValue::Bool)
            .ok_or_else(|| wrong("true or false")),
        DynSolType::Uint(bits) => {
            let digits = integer_text(json).ok_or_else(|| {
                wrong("an integer: a decimal or 0x-hex string, or a JSON integer")
            })?;
            parse_uint(&digits, *bits)
                .map(|v| DynSolValue::Uint(v, *bits))
                .map_err(|why| AbiError::new(field, format!("{field} ({ty}): {why}")))
        }
        DynSolType::Int(bits) => {
            let digits = integer_text(json)
                .ok_or_else(|| wrong("an integer: a decimal string or a JSON integer"))?;
            parse_int(&digits, *bits)
                .map(|v| DynSolValue::Int(v, *bits))
                .map_err(|why| AbiError::new(field, format!("{field} ({ty}): {why}")))
        }
        DynSolType::String => Ok(DynSolValue::String(text()?.to_owned())),
        DynSolType::Bytes => {
            let bytes: aggregates::HexBytes = text()?
                .parse()
                .map_err(|e| AbiError::new(field, format!("{field} (bytes): {e}")))?;
            Ok(DynSolValue::Bytes(bytes.as_slice().to_vec()))
        }
        DynSolType::FixedBytes(size) => {
            let bytes: aggregates::HexBytes = text()?
                .parse()
                .map_err(|e| AbiError::new(field, format!("{field} ({ty}): {e}")))?;
            if bytes.as_slice().len() != *size {
                return Err(wrong(&format!("exactly {size} bytes of 0x-hex")));
            }
            let mut word = alloy::primitives::B256::ZERO;
            word[..*size].copy_from_slice(bytes.as_slice());
            Ok(DynSolValue::FixedBytes(word, *size))
        }
        DynSolType::Array(inner) => {
            let items = json.as_array().ok_or_else(|| wrong("a JSON array"))?;
            items
                .iter()
                .enumerate()
                .map(|(i, v)| json_to_value(inner, v, &format!("{field}[{i}]")))
                .collect::<Result<_, _>>()
                .map(DynSolValue::Array)
        }
        DynSolType::FixedArray(inner, len) => {
            let items = json.as_array().ok_or_else(|| wrong("a JSON array"))?;
            if items.len() != *len {
                return Err(wrong(&format!("an array of exactly {len} items")));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, v)| json_to_value(inner, v, &format!("{field}[{i}]")))
                .collect::<Result<_, _>>()
                .map(DynSolValue::FixedArray)
        }
        DynSolType::Tuple(types) => {
            let items = json
                .as_array()
                .filter(|items| items.len() == types.len())
                .ok_or_else(|| {
                    wrong(&format!(
                        "a JSON array of its {} components, in order",
                        types.len()
                    ))
                })?;
            types
                .iter()
                .zip(items)
                .enumerate()
                .map(|(i, (t, v))| json_to_value(t, v, &format!("{field}[{i}]")))
                .collect::<Result<_, _>>()
                .map(DynSolValue::Tuple)
        }
        other => Err(AbiError::new(
            field,
            format!("{field}: arguments of type {other} are not supported"),
        )),
    }
}

/// The digits of an integer argument: a JSON string, or a JSON integer (floats are refused: a
/// JSON number above 2^53 has already lost precision).
fn integer_text(json: &Value) -> Option<String> {
    match json {
        Value::String(s) => Some(s.trim().to_owned()),
        Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        _ => None,
    }
}

fn parse_uint(text: &str, bits: usize) -> Result<U256, String> {
    let value = if let Some(hex) = text.strip_prefix("0x") {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{text:?} is not a hex integer"));
        }
        U256::from_str_radix(hex, 16).map_err(|_| "the value exceeds 2^256-1".to_owned())?
    } else {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "{text:?} is not a non-negative integer (decimal or 0x-hex)"
            ));
        }
        U256::from_str_radix(text, 10).map_err(|_| "the value exceeds 2^256-1".to_owned())?
    };
    if bits < 256 && value >> bits != U256::ZERO {
        return Err(format!("{text} does not fit in uint{bits}"));
    }
    Ok(value)
}

fn parse_int(text: &str, bits: usize) -> Result<I256, String> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text:?} is not a decimal integer"));
    }
    let value = I256::from_dec_str(text).map_err(|_| format!("{text} does not fit in int256"))?;
    let (min, max) = (I256::MIN.asr(256 - bits), I256::MAX.asr(256 - bits));
    if value < min || value > max {
        return Err(format!("{text} does not fit in int{bits}"));
    }
    Ok(value)
}

/// `increment(by: 5)`: `function` with its arguments decoded from `calldata` (selector
/// included), or `None` when the calldata is not a call of that function.
pub fn describe_call(function: &Function, calldata: &[u8]) -> Option<String> {
    let (selector, args) = calldata.split_at_checked(4)?;
    if selector != function.selector().as_slice() {
        return None;
    }
    let values = function.abi_decode_input(args).ok()?;
    let names = function.inputs.iter().map(|p| p.name());
    Some(format!(
        "{}({})",
        function.name,
        format_args_list(names, &values)
    ))
}

fn format_args_list<'a>(names: impl Iterator<Item = &'a str>, values: &[DynSolValue]) -> String {
    let mut shown: Vec<String> = names
        .zip(values)
        .take(MAX_SHOWN_ITEMS)
        .map(|(name, v)| {
            if name.is_empty() {
                format_value(v)
            } else {
                format!("{name}: {}", format_value(v))
            }
        })
        .collect();
    if values.len() > MAX_SHOWN_ITEMS {
        shown.push(format!("… {} more", values.len() - MAX_SHOWN_ITEMS));
    }
    shown.join(", ")
}

fn format_list(open: char, items: &[DynSolValue], close: char) -> String {
    let mut shown: Vec<String> = items
        .iter()
        .take(MAX_SHOWN_ITEMS)
        .map(format_value)
        .collect();
    if items.len() > MAX_SHOWN_ITEMS {
        shown.push(format!("… {} more", items.len() - MAX_SHOWN_ITEMS));
    }
    format!("{open}{}{close}", shown.join(", "))
}

fn format_bytes(bytes: &[u8]) -> String {
    if bytes.len() <= MAX_SHOWN_BYTES {
        format!("0x{}", hex::encode(bytes))
    } else {
        format!(
            "0x{}… ({} bytes)",
            hex::encode(&bytes[..MAX_SHOWN_BYTES]),
            bytes.len()
        )
    }
}

/// One decoded value, as a human reads it.
fn format_value(value: &DynSolValue) -> String {
    match value {
        DynSolValue::Address(a) => from_alloy(*a).short(),
        DynSolValue::Bool(b) => b.to_string(),
        DynSolValue::Uint(v, _) => v.to_string(),
        DynSolValue::Int(v, _) => v.to_string(),
        DynSolValue::String(s) => {
            let cleaned: String = s
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(MAX_SHOWN_CHARS)
                .collect();
            let more = if s.chars().count() > MAX_SHOWN_CHARS {
                "…"
            } else {
                ""
            };
            format!("{cleaned:?}{more}")
        }
        DynSolValue::Bytes(b) => format_bytes(b),
        DynSolValue::FixedBytes(word, size) => format_bytes(&word[..*size]),
        DynSolValue::Array(items) | DynSolValue::FixedArray(items) => format_list('[', items, ']'),
        DynSolValue::Tuple(items) => format_list('(', items, ')'),
        other => format!("{other:?}"),
    }
}

/// The reason in standard revert data: `Error(string)` or a compiler `Panic(uint256)`.
pub fn decode_revert(data: &[u8]) -> Option<String> {
    if let Ok(revert) = Revert::abi_decode(data) {
        return Some(revert.reason);
    }
    if let Ok(panic) = Panic::abi_decode(data) {
        return Some(match panic.kind() {
            Some(kind) => format!("panic: {}", kind.as_str()),
            None => format!("panic code {}", panic.code),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn target_abi() -> ContractAbi {
        ContractAbi::parse(&json!([
            {"type": "function", "name": "increment", "stateMutability": "nonpayable",
             "inputs": [{"name": "by", "type": "uint256"}], "outputs": []},
            {"type": "function", "name": "setPaused", "stateMutability": "nonpayable",
             "inputs": [{"name": "p", "type": "bool"}], "outputs": []},
            {"type": "function", "name": "pay", "stateMutability": "nonpayable",
             "inputs": [{"name": "to", "type": "address"}, {"name": "amount", "type": "uint8"}],
             "outputs": []},
            {"type": "function", "name": "pay", "stateMutability": "nonpayable",
             "inputs": [{"name": "to", "type": "address"}, {"name": "memo", "type": "string"}],
             "outputs": []},
            {"type": "function", "name": "batch", "stateMutability": "nonpayable",
             "inputs": [{"name": "ids", "type": "uint256[]"}, {"name": "tag", "type": "bytes4"},
                        {"name": "delta", "type": "int8"}],
             "outputs": []},
            {"type": "error", "name": "Unauthorized",
             "inputs": [{"name": "caller", "type": "address"}]}
        ]))
        .unwrap()
    }

    const BOB: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";

    #[test]
    fn a_call_encodes_and_decodes_back_for_the_prompt() {
        let abi = target_abi();
        let f = abi.function("increment", 1).unwrap();
        let data = encode_call(f, &[json!("5")]).unwrap();
        assert_eq!(hex::encode(&data[..4]), "7cf5dab0");
        assert_eq!(describe_call(f, &data).unwrap(), "increment(by: 5)");
        // A JSON integer works as well as a string.
        assert_eq!(encode_call(f, &[json!(5)]).unwrap(), data);
        let f = abi.function("batch", 3).unwrap();
        let data = encode_call(f, &[json!(["1", 2]), json!("0xdeadbeef"), json!("-3")]).unwrap();
        assert_eq!(
            describe_call(f, &data).unwrap(),
            "batch(ids: [1, 2], tag: 0xdeadbeef, delta: -3)"
        );
    }

    #[test]
    fn the_abi_may_come_as_a_string_or_an_artifact() {
        let text = json!(r#"[{"type":"function","name":"go","inputs":[],"outputs":[]}]"#);
        ContractAbi::parse(&text)
            .unwrap()
            .function("go", 0)
            .unwrap();
        let artifact = json!({"abi": [{"type":"function","name":"go","inputs":[],"outputs":[]}]});
        ContractAbi::parse(&artifact)
            .unwrap()
            .function("go", 0)
            .unwrap();
    }

    #[test]
    fn a_bad_abi_names_contract_abi() {
        for bad in [
            json!("not json"),
            json!({"x": 1}),
            json!([{"type": "function"}]),
        ] {
            let e = ContractAbi::parse(&bad).unwrap_err();
            assert_eq!(e.field, "contract_abi", "{bad}: {e}");
        }
    }

    #[test]
    fn function_lookup_errors_name_the_field_and_the_problem() {
        let abi = target_abi();
        let e = abi.function("decrement", 1).unwrap_err();
        assert_eq!(e.field, "function_name");
        assert!(e.message.contains("no function \"decrement\""), "{e}");
        let e = abi.function("increment", 2).unwrap_err();
        assert_eq!(e.field, "function_args");
        assert_eq!(e.message, "increment(uint256) takes 1 argument, got 2");
        let e = abi.function("pay", 2).unwrap_err();
        assert_eq!(e.field, "function_name");
        assert!(e.message.contains("overloaded"), "{e}");
        // The full signature picks the overload.
        let f = abi.function("pay(address, string)", 2).unwrap();
        assert_eq!(f.signature(), "pay(address,string)");
    }

    #[test]
    fn argument_type_errors_name_the_argument() {
        let abi = target_abi();
        let pay = abi.function("pay(address,uint8)", 2).unwrap();
        let cases = [
            (json!(["0x1234", 1]), "function_args[0]"),
            (json!([BOB, 256]), "function_args[1]"),
            (json!([BOB, "-1"]), "function_args[1]"),
            (json!([BOB, 1.5]), "function_args[1]"),
            (json!([BOB, "ten"]), "function_args[1]"),
        ];
        for (args, field) in cases {
            let e = encode_call(pay, args.as_array().unwrap()).unwrap_err();
            assert_eq!(e.field, field, "{args}: {e}");
        }
        let inc = abi.function("increment", 1).unwrap();
        let over = "115792089237316195423570985008687907853269984665640564039457584007913129639936";
        let e = encode_call(inc, &[json!(over)]).unwrap_err();
        assert_eq!(e.field, "function_args[0]");
        assert!(e.message.contains("exceeds 2^256-1"), "{e}");
        let set = abi.function("setPaused", 1).unwrap();
        let e = encode_call(set, &[json!("yes")]).unwrap_err();
        assert_eq!(e.field, "function_args[0]");
        let batch = abi.function("batch", 3).unwrap();
        let e = encode_call(batch, &[json!([1, "x"]), json!("0x00"), json!(0)]).unwrap_err();
        assert_eq!(e.field, "function_args[0][1]");
        let e = encode_call(batch, &[json!([]), json!("0x00"), json!(0)]).unwrap_err();
        assert_eq!(e.field, "function_args[1]", "bytes4 needs 4 bytes");
        let e = encode_call(batch, &[json!([]), json!("0x00000000"), json!(128)]).unwrap_err();
        assert_eq!(e.field, "function_args[2]", "int8 ends at 127");
    }

    #[test]
    fn revert_data_is_decoded_for_humans() {
        let data = Revert::from("Target: paused").abi_encode();
        assert_eq!(decode_revert(&data).unwrap(), "Target: paused");
        assert_eq!(decode_revert(&[0xde, 0xad]), None);
        let mut custom = alloy::primitives::keccak256("Unauthorized(address)")[..4].to_vec();
        custom.extend_from_slice(&[0u8; 12]);
        custom.extend_from_slice(&hex::decode(&BOB[2..]).unwrap());
        assert_eq!(
            target_abi().describe_error(&custom).unwrap(),
            "Unauthorized(caller: 0x7099…79C8)"
        );
    }
}
