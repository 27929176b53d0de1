// Run a GGUF file in llama.cpp (node-llama-cpp's prebuilt CPU binaries) for distill/llama_cpp.py.
//
//   node llama_cpp.mjs < request.json > answer.json
//
// request: {model, threads, context, kv_type ("F16" or "F32"), flash_attention, jobs: [...]}, one job each:
//   {kind: "tokenize", text}                       -> {tokens}
//   {kind: "evaluate", tokens, top}                -> {positions: [[[token, prob], ...top], ...]}: the next-token
//                                                     distribution after every prefix of `tokens` (greedy order)
//   {kind: "greedy", tokens, steps}                -> {tokens}: the greedy continuation
//   {kind: "speed", prompt_tokens, decode_tokens}  -> {prefill_s, decode_s, token_s, tokens}: a random prompt, then
//                                                     greedy decoding (token_s: the seconds of each decoded token);
//       optional save_state: a file that receives the prefilled state (untimed), load_state: such a file
//       (same model and context) read instead of prefilling (prefill_s is then null)
// The answer also carries {rss_bytes (peak), state_bytes, model_bytes}. Errors go to stderr with exit status 1.
// With PERF_CTL_FIFO set (a `perf record --control fifo:...` control FIFO), the profiler records decoding only.
import {readFileSync, writeFileSync} from "node:fs";

const profile = (command) => process.env.PERF_CTL_FIFO && writeFileSync(process.env.PERF_CTL_FIFO, command + "\n");

// node-llama-cpp lives in the asset cache, not next to this file: distill/llama_cpp.py passes its entry point.
const {getLlama, LlamaLogLevel} = await import(process.env.NODE_LLAMA_CPP_ENTRY);

const request = JSON.parse(readFileSync(0, "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error, maxThreads: request.threads});
const model = await llama.loadModel({modelPath: request.model, gpuLayers: 0});
const context = await model.createContext({
    contextSize: request.context, batchSize: Math.min(request.context, 512), threads: request.threads,
    sequences: 1, flashAttention: Boolean(request.flash_attention),
    experimentalKvCacheKeyType: request.kv_type, experimentalKvCacheValueType: request.kv_type,
});
const sequence = context.getSequence();
const answers = [];

for (const job of request.jobs) {
    await sequence.clearHistory();
    if (job.kind === "tokenize") {
        answers.push({tokens: Array.from(model.tokenize(job.text, true))});
    } else if (job.kind === "evaluate") {
        const input = job.tokens.map((token) => [token, {generateNext: {probabilities: true}}]);
        const results = await sequence.controlledEvaluate(input);
        answers.push({positions: results.map((result) =>
            Array.from(result.next.probabilities.entries()).slice(0, job.top))});
    } else if (job.kind === "greedy") {
        const out = [];
        for await (const token of sequence.evaluate(job.tokens, {temperature: 0, yieldEogToken: true})) {
            out.push(token);
            if (out.length >= job.steps) break;
        }
        answers.push({tokens: out});
    } else if (job.kind === "speed") {
        const prompt = Array.from({length: job.prompt_tokens}, (_, i) => 100 + ((i * 7919) % 20000));
        let start = process.hrtime.bigint();
        let prefill_s = null;
        if (job.load_state) {
            await sequence.loadStateFromFile(job.load_state, {acceptRisk: true});
        } else {
            await sequence.controlledEvaluate(prompt.slice(0, -1));
            prefill_s = Number(process.hrtime.bigint() - start) / 1e9;
            if (job.save_state) await sequence.saveStateToFile(job.save_state);
        }
        let last = prompt[prompt.length - 1];
        profile("enable");
        start = process.hrtime.bigint();
        const token_s = [];
        let previous = start;
        const tokens = [];
        for await (const token of sequence.evaluate([last], {temperature: 0, yieldEogToken: true})) {
            const now = process.hrtime.bigint();
            token_s.push(Number(now - previous) / 1e9);
            previous = now;
            tokens.push(token);
            if (token_s.length >= job.decode_tokens) break;
        }
        const decode_s = Number(process.hrtime.bigint() - start) / 1e9;
        profile("disable");
        answers.push({prefill_s, decode_s, token_s, tokens});
    }
}
const usage = {rss_bytes: process.resourceUsage().maxRSS * 1024, state_bytes: context.stateSize, model_bytes: model.size};
await context.dispose();
await model.dispose();
process.stdout.write(JSON.stringify({answers, ...usage}));
