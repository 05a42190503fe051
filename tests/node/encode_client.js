#!/usr/bin/env node
// A non-Python SIE client: loads proto/sie/v1 directly (no generated code) and
// checks that the wire contract is usable from @grpc/grpc-js.
//
//   node encode_client.js <address> <model> <text>
//
// Prints one JSON line on stdout:
//   {"models": [...], "id": ..., "dims": ..., "num_tokens": ..., "dense": [...],
//    "error_code": <grpc code>, "error_details": "...", "error_reason": "..."}
// Exits non-zero, with a message on stderr, on any unexpected failure.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const DEADLINE_MS = 60000;
const MISSING_MODEL = 'sie-node-test/no-such-model';

function fail(message) {
  process.stderr.write(`encode_client: ${message}\n`);
  process.exit(1);
}

function loadServices() {
  // google/protobuf/struct.proto is not in PROTO_ROOT: proto-loader (via
  // protobufjs) ships the well-known types and resolves them itself.
  const definition = protoLoader.loadSync(['sie/v1/encode.proto', 'sie/v1/models.proto'], {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const sie = grpc.loadPackageDefinition(definition).sie.v1;
  return { EncodeService: sie.EncodeService, ModelService: sie.ModelService };
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + DEADLINE_MS);
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

// Little-endian float32 Tensor -> plain array of numbers.
function decodeFloat32(tensor, dims) {
  if (!tensor) fail('dense result has no values tensor');
  if (tensor.dtype !== 'DTYPE_FLOAT32') fail(`expected DTYPE_FLOAT32, got ${tensor.dtype}`);
  const shape = tensor.shape;
  if (shape.length !== 1 || shape[0] !== dims) {
    fail(`expected shape [${dims}], got ${JSON.stringify(shape)}`);
  }
  const data = tensor.data;
  if (!Buffer.isBuffer(data) || data.length !== dims * 4) {
    fail(`expected ${dims * 4} data bytes, got ${data && data.length}`);
  }
  const out = new Array(dims);
  // readFloatLE: byte order explicit, no alignment assumption on the Buffer.
  for (let i = 0; i < dims; i++) out[i] = data.readFloatLE(i * 4);
  return out;
}

// --- Minimal protobuf wire reader for grpc-status-details-bin -------------
// google.rpc.Status {int32 code = 1; string message = 2; repeated Any details = 3;}
// google.protobuf.Any {string type_url = 1; bytes value = 2;}
// google.rpc.ErrorInfo {string reason = 1; string domain = 2; map<string,string> metadata = 3;}
// Hand-rolled so that the only dependencies are the two @grpc packages.

function readFields(buf) {
  const fields = [];
  let pos = 0;
  const varint = () => {
    let result = 0;
    let scale = 1;
    for (;;) {
      if (pos >= buf.length) throw new Error('truncated varint');
      const byte = buf[pos++];
      result += (byte & 0x7f) * scale;
      if (byte < 0x80) return result;
      scale *= 128;
    }
  };
  while (pos < buf.length) {
    const key = varint();
    const field = Math.floor(key / 8);
    const wire = key % 8;
    if (wire === 0) fields.push({ field, value: varint() });
    else if (wire === 2) {
      const len = varint();
      if (pos + len > buf.length) throw new Error('truncated field');
      fields.push({ field, value: buf.subarray(pos, pos + len) });
      pos += len;
    } else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else throw new Error(`unsupported wire type ${wire}`);
  }
  return fields;
}

function errorInfoOf(err) {
  const raw = err.metadata && err.metadata.get('grpc-status-details-bin');
  if (!raw || raw.length === 0) return null;
  for (const detail of readFields(raw[0]).filter((f) => f.field === 3)) {
    const any = readFields(detail.value);
    const typeUrl = any.find((f) => f.field === 1);
    const value = any.find((f) => f.field === 2);
    if (!typeUrl || !typeUrl.value.toString('utf8').endsWith('/google.rpc.ErrorInfo')) continue;
    const info = { reason: '', domain: '' };
    for (const f of readFields(value ? value.value : Buffer.alloc(0))) {
      if (f.field === 1) info.reason = f.value.toString('utf8');
      else if (f.field === 2) info.domain = f.value.toString('utf8');
    }
    return info;
  }
  return null;
}

async function main() {
  const [address, model, text] = process.argv.slice(2);
  if (!address || !model || text === undefined) {
    fail('usage: node encode_client.js <address> <model> <text>');
  }
  const { EncodeService, ModelService } = loadServices();
  const credentials = grpc.credentials.createInsecure();
  const models = new ModelService(address, credentials);
  const encoder = new EncodeService(address, credentials);
  try {
    const listed = await unary(models, 'ListModels', {});
    const names = listed.models.map((m) => m.name);

    const response = await unary(encoder, 'Encode', {
      model,
      items: [{ id: 'n1', text }],
      params: { output_types: ['dense'] },
    });
    if (response.items.length !== 1) fail(`expected 1 result, got ${response.items.length}`);
    const item = response.items[0];
    if (!item.dense) fail('result has no dense vector');
    const dims = item.dense.dims;
    const dense = decodeFloat32(item.dense.values, dims);

    let error;
    try {
      await unary(encoder, 'Encode', { model: MISSING_MODEL, items: [{ id: 'x', text }] });
    } catch (err) {
      error = err;
    }
    if (!error) fail(`Encode with unknown model ${MISSING_MODEL} unexpectedly succeeded`);
    if (typeof error.code !== 'number') throw error; // not a gRPC status: unexpected
    const info = errorInfoOf(error);

    const result = {
      models: names,
      id: item.id,
      dims,
      num_tokens: item.num_tokens,
      dense,
      error_code: error.code,
      error_details: error.details,
      error_reason: info ? info.reason : null,
      error_domain: info ? info.domain : null,
    };
    process.stdout.write(JSON.stringify(result) + '\n');
  } finally {
    models.close();
    encoder.close();
  }
}

main().catch((err) => fail(err && err.stack ? err.stack : String(err)));
