//! `wordcount`: word frequencies of a text, JSON in and out.
//!
//! Request: `{"text": "the cat and the hat"}`.
//! Response: `{"words":5,"unique":4,"frequencies":{"and":1,"cat":1,"hat":1,"the":2}}`.
//! Words are runs of letters, digits and apostrophes, lowercased; keys are sorted.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::{collections::BTreeMap, string::String};

use fnode_guest::{Function, Response};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Request<'a> {
    #[serde(borrow)]
    text: alloc::borrow::Cow<'a, str>,
}

#[derive(Serialize)]
struct Counts {
    words: usize,
    unique: usize,
    frequencies: BTreeMap<String, u64>,
}

struct WordCount;

impl Function for WordCount {
    fn init() -> Self {
        WordCount
    }

    fn handle(&mut self, request: &[u8]) -> Response<'_> {
        let request: Request<'_> = serde_json::from_slice(request).map_err(|e| {
            fnode_guest::Error::msg(format_args!("expected {{\"text\": \"...\"}}: {e}"))
        })?;
        let mut frequencies = BTreeMap::new();
        let mut words = 0;
        for word in request
            .text
            .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        {
            let word = word.trim_matches('\'');
            if word.is_empty() {
                continue;
            }
            words += 1;
            *frequencies.entry(word.to_lowercase()).or_insert(0) += 1;
        }
        let counts = Counts {
            words,
            unique: frequencies.len(),
            frequencies,
        };
        Ok(serde_json::to_vec(&counts)?.into())
    }
}

fnode_guest::entry!(WordCount);
