#!/usr/bin/env node
// The golden-case runner: performs the call a case JSON describes and writes every output.* (and,
// where cheap, intermediate.*) tensor it computes under the same names.
//
//   node scripts/run-case.mjs --case <cases/x.json> --model <model folder> --out <out.safetensors> [--compare]
//
// Inputs come from the case's own safetensors file (the `file` next to the JSON); paths inside a
// case (images, weights) are relative to the fixtures root, the parent of cases/. `--model` names
// the model folder the case needs (tiny-sd/ for SD components, tiny-clip/ for clip_model, lpips/ for lpips_alex).
// `--compare` also prints each tensor's max abs/rel difference against the golden.
// Exit codes: 0 done, 1 error (or --compare beyond tolerance), 2 bad arguments, 3 unsupported kind.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(import.meta.url);

function parseArgs(argv) {
  const args = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--compare') args.compare = true;
    else if (a.startsWith('--') && i + 1 < argv.length) args[a.slice(2)] = argv[++i];
    else throw new Error(`unexpected argument ${a}`);
  }
  for (const k of ['case', 'model', 'out']) if (!args[k]) throw new Error(`missing --${k}`);
  return args;
}

class Unsupported extends Error {}

const f32 = (data, shape) => ({ dtype: 'F32', shape, data: Float32Array.from(data) });
const i64 = (data, shape) => ({ dtype: 'I64', shape, data: BigInt64Array.from(data, (x) => BigInt(x)) });

/** The case kind: its name without a numeric/size suffix where the family shares one runner. */
function kindOf(name) {
  if (name.startsWith('scheduler_ddpm')) return 'scheduler_ddpm_add_noise';
  if (name.startsWith('scheduler_')) return 'scheduler';
  if (name.startsWith('clip_image_processor')) return 'clip_image_processor';
  if (name.startsWith('pipeline_')) return 'pipeline';
  return name;
}

/** Every kind: (ctx) => { name: tensor } with output./intermediate. prefixes. */
const RUNNERS = {
  async text_encoder({ lib, model, inputs, json }) {
    const te = await lib.loadComponent('clip_text', path.join(model, 'text_encoder'));
    let ids = inputs['input.input_ids'];
    if (!ids) ids = promptIds(lib, model, json.call.prompts);
    const out = await te.run('forward', { input_ids: ids });
    te.dispose();
    return prefixed(out, { last_hidden_state: 'output.', pooler_output: 'output.' }, 'intermediate.');
  },

  async text_encoder_replace_star({ lib, model, inputs, json }) {
    const te = await lib.loadComponent('clip_text', path.join(model, 'text_encoder'));
    const ids = inputs['input.input_ids'] ?? promptIds(lib, model, json.call.prompts);
    const star = BigInt(json.call.star_token_id ?? 265);
    const [B, L] = ids.shape;
    const index = [];
    for (let b = 0; b < B; b++) for (let p = 0; p < L; p++) if (ids.data[b * L + p] === star) index.push(b, p);
    const out = await te.run('forward', { input_ids: ids, replace_index: i64(index, [index.length / 2, 2]), replace_values: inputs['input.v'] });
    te.dispose();
    return { 'output.last_hidden_state': out.last_hidden_state };
  },

  async unet({ lib, model, inputs }) {
    const unet = await lib.loadComponent('unet', path.join(model, 'unet'));
    const out = await unet.run('forward_debug', {
      sample: inputs['input.latents'],
      timestep: inputs['input.timesteps'],
      encoder_hidden_states: inputs['input.encoder_hidden_states'],
    });
    unet.dispose();
    return prefixed(out, { sample: 'output.' }, 'intermediate.');
  },

  async vae({ lib, model, inputs }) {
    const vae = await lib.loadComponent('vae', path.join(model, 'vae'));
    const enc = await vae.run('encode', { sample: inputs['input.image'] });
    const dec = await vae.run('decode', { latent: enc.latent_mean });
    vae.dispose();
    return {
      'output.latent_mean': enc.latent_mean,
      'output.latent_std': enc.latent_std,
      'output.latent_logvar': enc.latent_logvar,
      'output.latent_mean_scaled': enc.latent_mean_scaled,
      'output.decoded': dec.sample,
      'intermediate.encoder_out': enc.encoder_out,
      'intermediate.moments': enc.moments,
      'intermediate.post_quant_conv_out': dec.post_quant_conv_out,
    };
  },

  async image_encoder({ lib, model, inputs }) {
    const enc = await lib.loadComponent('clip_vision', path.join(model, 'image_encoder'));
    const out = await enc.run('forward', { pixel_values: inputs['input.pixel_values'] });
    enc.dispose();
    return prefixed(out, { image_embeds: 'output.', last_hidden_state: 'output.' }, 'intermediate.');
  },

  async dino_vit({ lib, model, inputs }) {
    const vit = await lib.loadComponent('vit', path.join(model, 'dino'));
    const out = await vit.run('forward', { pixel_values: inputs['input.pixel_values'] });
    vit.dispose();
    return prefixed(out, { last_hidden_state: 'output.', cls: 'output.' }, 'intermediate.');
  },

  async clip_model({ lib, model, inputs }) {
    const clip = await lib.loadComponent('clip', model);
    const out = await clip.run('forward', { input_ids: inputs['input.input_ids'], pixel_values: inputs['input.pixel_values'] });
    clip.dispose();
    const outputs = ['image_embeds', 'text_embeds', 'logits_per_image', 'logits_per_text', 'cosine'];
    return prefixed(out, Object.fromEntries(outputs.map((k) => [k, 'output.'])), 'intermediate.');
  },

  // LPIPS v0.1 / AlexNet; --model is the lpips folder (one .safetensors with features.* and lin*)
  async lpips_alex({ lib, model, inputs }) {
    const lpips = await lib.loadLpips(model);
    const out = await lpips.run('forward', { in0: inputs['input.in0'], in1: inputs['input.in1'] });
    lpips.dispose();
    return prefixed(out, { distance: 'output.', per_layer: 'output.' }, 'intermediate.');
  },

  // CLIPImageProcessor on the case's PNGs: output.pixel_values<i> for each stage image<i>
  async clip_image_processor({ lib, json, fixtures }) {
    const config = lib.resolvePreprocessorConfig(json.call.config, 'clip', 'case config');
    const out = {};
    for (const [key, stage] of Object.entries(json.call.stages)) {
      const t = await lib.clipPreprocess(path.join(fixtures, stage.input_png), config);
      out[`output.pixel_values${key.replace('image', '')}`] = { dtype: 'F32', shape: [1, ...t.shape], data: t.data };
    }
    return out;
  },

  async scheduler({ lib, model, inputs, json, name }) {
    const m = name.match(/^scheduler_(.+)_(\d+)$/);
    const steps = Number(m[2]);
    const config = JSON.parse(fs.readFileSync(path.join(model, 'scheduler', 'scheduler_config.json'), 'utf8'));
    const info = lib.schedulerInfo(m[1], config, steps);
    const traj = await lib.schedulerTrajectory(m[1], config, steps, inputs['input.noise']);
    const out = {
      'output.timesteps': info.timestepDtype === 'F32' ? f32(info.timesteps, [info.timesteps.length]) : i64(info.timesteps, [info.timesteps.length]),
      'output.trajectory': traj.trajectory,
      'output.model_inputs': traj.model_inputs,
      'output.model_outputs': traj.model_outputs,
      'output.init_noise_sigma': f32([info.initNoiseSigma], []),
    };
    if (info.sigmas) out['output.sigmas'] = f32(info.sigmas, [info.sigmas.length]);
    return out;
  },

  async scheduler_ddpm_add_noise({ lib, model, inputs }) {
    const config = JSON.parse(fs.readFileSync(path.join(model, 'scheduler', 'scheduler_config.json'), 'utf8'));
    const info = lib.schedulerInfo('ddpm', config, 1);
    return {
      'output.noisy': await lib.ddpmAddNoise(config, inputs['input.x0'], inputs['input.noise'], inputs['input.timesteps']),
      'output.betas': f32(info.betas, [info.betas.length]),
      'output.alphas_cumprod': f32(info.alphasCumprod, [info.alphasCumprod.length]),
    };
  },

  // StableDiffusionPipeline.__call__ with given latents; the scheduler class names the sampler.
  // Optional add-ons, paths relative to the fixtures root (or absolute), one object or a list each:
  //   call.lora: { file, scale = 1 }    a kohya LoRA applied for the call (diffusers: load_lora_weights + scale)
  //   call.embedding: { file, placeholder }   a textual-inversion embedding for a placeholder in the prompts
  async pipeline({ lib, model, inputs, json, fixtures }) {
    const args = json.call.args;
    const cls = (json.call.scheduler ?? 'PNDMScheduler').match(/^(\w+)Scheduler/)?.[1];
    const scheduler = { DDIM: 'ddim', PNDM: 'pndm', EulerDiscrete: 'euler', DPMSolverMultistep: 'dpmpp-2m' }[cls];
    if (!scheduler) throw new Unsupported(`scheduler ${json.call.scheduler} is not supported by the runner`);
    const list = (x) => (x === undefined ? [] : Array.isArray(x) ? x : [x]);
    const loras = list(json.call.lora).map((l) => ({ file: path.resolve(fixtures, l.file ?? l), scale: l.scale ?? 1 }));
    const p = await lib.loadPipeline(model);
    const hiddenSize = p.textEncoder.config.hidden_size;
    const embeddings = [];
    for (const e of list(json.call.embedding)) {
      const loaded = await lib.loadEmbedding(path.resolve(fixtures, e.file), { hiddenSize });
      embeddings.push({ vectors: loaded.vectors, placeholder: e.placeholder ?? loaded.suggestedPlaceholder });
    }
    const result = await lib.generate(p, {
      loras,
      embeddings,
      prompt: args.prompt,
      negativePrompt: args.negative_prompt ?? '',
      guidance: args.guidance_scale,
      steps: args.num_inference_steps,
      width: args.width,
      height: args.height,
      eta: args.eta ?? 0,
      scheduler,
      latents: inputs['input.latents'],
      returnIntermediates: true,
    });
    p.dispose();
    const [img] = result.images;
    const B = result.images.length;
    const image = new Float32Array(B * img.float.length);
    result.images.forEach((im, i) => image.set(im.float, i * im.float.length));
    const out = { 'output.image': { dtype: 'F32', shape: [B, img.height, img.width, 3], data: image } };
    for (const [k, v] of Object.entries(result.intermediates)) out[`intermediate.${k}`] = v;
    return out;
  },

  // SingleInsert losses and gradients (README "singleinsert_losses"): stage I w.r.t. v, stage II
  // (L_sm) w.r.t. the kohya LoRA tensors the recipe names
  async singleinsert_losses({ lib, model, inputs, json, fixtures }) {
    const recipe = (json.call.recipe ?? []).join('\n');
    const layer = recipe.match(/'(lora_(?:unet|te)_[A-Za-z0-9_]+)\.lora_down\.weight'/)?.[1];
    if (!layer) throw new Unsupported('the case names no LoRA tensor for the L_sm gradients');
    const p = await lib.loadPipeline(model);
    const native = require(path.join(root, 'dist', 'lib', 'native.js')).native();
    const config = JSON.stringify(lib.resolveSchedulerConfig(p.schedulerConfig, 'scheduler config', 'ddpm'));
    const out = await native.singleinsertLossCase({
      unet: p.unet.nativeHandle(),
      vae: p.vae.nativeHandle(),
      textEncoder: p.textEncoder.nativeHandle(),
      scheduleConfig: config,
      image: inputs['input.image'],
      mask_fullres: inputs['input.mask_fullres'],
      timesteps: inputs['input.timesteps'],
      noise: inputs['input.noise'],
      input_ids_star: inputs['input.input_ids_star'],
      input_ids_class: inputs['input.input_ids_class'],
      v: inputs['input.v'],
      lora: path.join(fixtures, 'lora', 'lora.safetensors'),
      lora_target_keys: [`${layer}.lora_down.weight`, `${layer}.lora_up.weight`],
    });
    p.dispose();
    return out;
  },

  async lora_outputs({ lib, model, inputs, fixtures, json }) {
    const unet = await lib.loadComponent('unet', path.join(model, 'unet'));
    const te = await lib.loadComponent('clip_text', path.join(model, 'text_encoder'));
    const loraFile = path.join(fixtures, json.call.lora_file ?? 'lora/lora.safetensors');
    const unetIn = { sample: inputs['input.latents'], timestep: inputs['input.timesteps'], encoder_hidden_states: inputs['input.encoder_hidden_states'] };
    const teIn = { input_ids: inputs['input.input_ids'] };
    const out = {
      'intermediate.unet_sample_no_lora': (await unet.run('forward', unetIn)).sample,
      'intermediate.text_last_hidden_state_no_lora': (await te.run('forward', teIn)).last_hidden_state,
    };
    for (const scale of [1.0, 0.5]) {
      await lib.applyLora([unet, te], loraFile, { scale });
      out[`output.unet_sample_scale${scale.toFixed(1)}`] = (await unet.run('forward', unetIn)).sample;
      out[`output.text_last_hidden_state_scale${scale.toFixed(1)}`] = (await te.run('forward', teIn)).last_hidden_state;
      await lib.clearLora([unet, te]);
    }
    unet.dispose();
    te.dispose();
    return out;
  },
};

function prefixed(out, outputNames, otherPrefix) {
  const result = {};
  for (const [k, v] of Object.entries(out)) result[(outputNames[k] ?? otherPrefix) + k] = v;
  return result;
}

function promptIds(lib, model, prompts) {
  const tok = lib.ClipTokenizer.fromDir(path.join(model, 'tokenizer'));
  const ids = [];
  for (const p of prompts) ids.push(...tok.call(p).inputIds);
  return i64(ids, [prompts.length, 77]);
}

function compare(outputs, golden) {
  let worst = 0;
  const rows = [];
  for (const [name, t] of Object.entries(outputs)) {
    const g = golden[name];
    if (!g) continue;
    if (JSON.stringify(g.shape) !== JSON.stringify(t.shape)) {
      rows.push(`${name}: shape ${JSON.stringify(t.shape)} vs golden ${JSON.stringify(g.shape)}`);
      worst = Infinity;
      continue;
    }
    let maxAbs = 0;
    let maxRef = 0;
    for (let i = 0; i < t.data.length; i++) {
      maxAbs = Math.max(maxAbs, Math.abs(Number(t.data[i]) - Number(g.data[i])));
      maxRef = Math.max(maxRef, Math.abs(Number(g.data[i])));
    }
    rows.push(`${name}: max abs ${maxAbs.toExponential(2)} (max |ref| ${maxRef.toPrecision(3)})`);
    // 5e-4 absolute or 1e-4 relative to the tensor's scale: the fixtures README's loosest suggestions
    worst = Math.max(worst, maxAbs / Math.max(5e-4, 1e-4 * maxRef));
  }
  return { rows, ok: worst <= 1 };
}

async function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (e) {
    console.error(`run-case: ${e.message}\nusage: node scripts/run-case.mjs --case <case.json> --model <model folder> --out <out.safetensors> [--compare]`);
    return 2;
  }
  const lib = require(path.join(root, 'dist', 'lib', 'index.js'));
  const casePath = path.resolve(args.case);
  const fixtures = path.dirname(path.dirname(casePath));
  const text = fs.readFileSync(casePath, 'utf8').replace(/(?<=[:\[,]\s*)(-?Infinity|NaN)(?=\s*[,\]}])/g, '"$1"');
  const json = JSON.parse(text);
  const name = json.name ?? path.basename(casePath, '.json');
  const runner = RUNNERS[kindOf(name)];
  if (!runner) {
    console.error(`run-case: case kind "${kindOf(name)}" (${name}) is not supported by this runner (supported: ${Object.keys(RUNNERS).join(', ')})`);
    return 3;
  }
  const { tensors } = await lib.readSafetensors(path.join(path.dirname(casePath), json.file ?? `${name}.safetensors`));
  const inputs = Object.fromEntries(Object.entries(tensors).filter(([k]) => k.startsWith('input.')));
  let outputs;
  try {
    outputs = await runner({ lib, model: path.resolve(args.model), inputs, json, name, fixtures });
  } catch (e) {
    if (e instanceof Unsupported) {
      console.error(`run-case: ${e.message}`);
      return 3;
    }
    throw e;
  }
  await lib.writeSafetensors(path.resolve(args.out), outputs, { case: name });
  console.log(`run-case: ${name}: wrote ${Object.keys(outputs).length} tensors to ${args.out}`);
  if (args.compare) {
    const { rows, ok } = compare(outputs, tensors);
    for (const r of rows) console.log(`  ${r}`);
    if (!ok) {
      console.error('run-case: some tensors differ from the golden beyond tolerance');
      return 1;
    }
  }
  return 0;
}

main().then(
  (code) => (process.exitCode = code),
  (e) => {
    console.error(`run-case: ${e.stack ?? e}`);
    process.exitCode = 1;
  },
);
