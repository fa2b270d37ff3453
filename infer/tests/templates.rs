//! Chat templates rendered like `transformers` (jinja2) renders them.
//!
//! `tests/fixtures/templates.json` is made by `make_template_fixture.py` with
//! jinja2 in the environment `transformers` uses.

use hashgrid_infer::template::{ChatMessage, TemplateError, render_chat};
use hashgrid_infer::template::{MAX_TEMPLATE_BYTES, TEMPLATE_FUEL};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    template: String,
    messages: Vec<Message>,
    add_generation_prompt: bool,
    bos_token: String,
    eos_token: String,
    expected: Option<String>,
    raised: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

fn cases() -> Vec<Case> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/templates.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture readable"))
        .expect("fixture parses")
}

fn msgs(list: &[(&str, &str)]) -> Vec<ChatMessage> {
    list.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect()
}

#[test]
fn templates_match_jinja2() {
    let all = cases();
    assert!(all.len() >= 8);
    for case in &all {
        let messages: Vec<ChatMessage> = case
            .messages
            .iter()
            .map(|m| ChatMessage::new(&m.role, &m.content))
            .collect();
        let got = render_chat(
            &case.template,
            &messages,
            case.add_generation_prompt,
            &case.bos_token,
            &case.eos_token,
        );
        match (&case.expected, &case.raised) {
            (Some(want), _) => assert_eq!(got.as_ref(), Ok(want), "template {}", case.name),
            (None, Some(message)) => assert_eq!(
                got,
                Err(TemplateError::Raised(message.clone())),
                "template {}",
                case.name
            ),
            (None, None) => panic!("fixture case {} has neither output nor error", case.name),
        }
    }
}

#[test]
fn raise_exception_message_is_reported() {
    let err = render_chat(
        "{{ raise_exception('no system role, please') }}",
        &[],
        false,
        "",
        "",
    );
    assert_eq!(
        err,
        Err(TemplateError::Raised("no system role, please".into()))
    );
    assert_eq!(
        err.map_err(|e| e.to_string()),
        Err("the chat template raised an exception: no system role, please".to_string())
    );
}

#[test]
fn strftime_now_formats_today() {
    let out = render_chat(
        "{{ strftime_now('%Y-%m-%d|%d %b %Y') }}",
        &[],
        false,
        "",
        "",
    )
    .expect("renders");
    let (iso, human) = out.split_once('|').expect("two parts");
    assert_eq!(iso.len(), 10);
    assert!(iso.starts_with("20"), "{iso}");
    assert_eq!(human.len(), 11, "{human}");
}

#[test]
fn hostile_templates_are_bounded() {
    let looping =
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
    assert_eq!(
        render_chat(looping, &[], false, "", ""),
        Err(TemplateError::OutOfFuel(TEMPLATE_FUEL))
    );
    let big = "x".repeat(MAX_TEMPLATE_BYTES + 1);
    assert!(matches!(
        render_chat(&big, &[], false, "", ""),
        Err(TemplateError::TooLarge { .. })
    ));
    let wide = "{% for i in range(100) %}{{ 'y' * 1000000 }}{% endfor %}";
    assert!(matches!(
        render_chat(wide, &[], false, "", ""),
        Err(TemplateError::OutputTooLarge(_))
    ));
    assert!(matches!(
        render_chat("{% for %}", &[], false, "", ""),
        Err(TemplateError::Syntax(_))
    ));
    assert!(matches!(
        render_chat("{{ 1 | no_such_filter }}", &[], false, "", ""),
        Err(TemplateError::Render(_))
    ));
    let deep = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
    assert!(render_chat(deep, &[], false, "", "").is_err());
}

#[test]
fn messages_are_visible_to_templates() {
    let out = render_chat(
        "{{ messages | length }}:{% for m in messages %}{{ m.role }}={{ m['content'] }};{% endfor %}{{ bos_token }}{{ eos_token }}{{ add_generation_prompt }}",
        &msgs(&[("user", "a"), ("assistant", "b")]),
        true,
        "<s>",
        "</s>",
    );
    assert_eq!(out.as_deref(), Ok("2:user=a;assistant=b;<s></s>True"));
}

#[test]
fn python_like_printing_and_dict_order() {
    let out = render_chat(
        "{{ {'z': 1, 'a': 2} | tojson }} {{ true }} {{ none }}|{{ 'a,b'.split(',') }}",
        &[],
        false,
        "",
        "",
    );
    println!("{out:?}");
    assert_eq!(
        out.as_deref().map(|s| s.split('|').next().unwrap_or("")),
        Ok("{\"z\": 1, \"a\": 2} True None")
    );
}

#[test]
fn long_chats_fit_the_fuel() {
    let template = concat!(
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}",
        "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}",
        "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}",
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    );
    let messages: Vec<ChatMessage> = (0..2000)
        .map(|i| {
            ChatMessage::new(
                if i % 2 == 0 { "user" } else { "assistant" },
                format!("message {i}"),
            )
        })
        .collect();
    let out = render_chat(template, &messages, true, "", "")
        .expect("2000 messages render within the fuel");
    assert!(out.ends_with("<|im_start|>assistant\n"));
}
