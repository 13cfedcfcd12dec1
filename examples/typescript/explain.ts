// A typed Node.js client of lvlm.v1.Explainer (the gateway, docs/api.md "Typed gRPC service").
// The types under gen/ are generated from the .proto files by proto-loader-gen-types
// (`npm run gen`); the same .proto files are loaded at run time by @grpc/proto-loader.
//
//   node dist/explain.js --address 127.0.0.1:50051 --image scene.png --question 'what color is the circle ?'
//
// Flags or environment: --address / LVLM_ADDRESS (default 127.0.0.1:50051), --image /
// LVLM_IMAGE, --question / LVLM_QUESTION, --methods a,b, --timeout-s (default 30),
// --proto-dir / LVLM_PROTO_DIR (default: the repository's proto/).
// Prints the answer and one line per heatmap. A rejected request (INVALID_ARGUMENT) prints the
// code, the message and the google.rpc.BadRequest field violations of the status details, and
// exits with status 2; any other error exits with 1.
import * as fs from "node:fs";
import * as path from "node:path";
import { parseArgs } from "node:util";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

import type { ProtoGrpcType as ErrorDetailsProto } from "./gen/error_details";
import type { ProtoGrpcType as ExplainerProto } from "./gen/explainer";
import type { ProtoGrpcType as StatusProto } from "./gen/status";
import type { ExplainRequest } from "./gen/lvlm_attribution/v1/ExplainRequest";
import type { ExplainResponse__Output } from "./gen/lvlm_attribution/v1/ExplainResponse";

const HERE = path.resolve(__dirname, "..");  // examples/typescript (this file runs from dist/)
const PROTO_FILES = ["lvlm_attribution/api/v1/explainer.proto", "google/rpc/status.proto",
                     "google/rpc/error_details.proto"];
// The same options as `npm run gen` (package.json), so the generated types match the objects.
const LOADER_OPTIONS: protoLoader.Options = { longs: String, enums: String, defaults: true,
                                              oneofs: true };
const STATUS_DETAILS_KEY = "grpc-status-details-bin";  // google.rpc.Status, binary

type Proto = ExplainerProto & StatusProto & ErrorDetailsProto;

function usage(message: string): never {
  console.error(`explain.js: ${message}\nusage: node dist/explain.js [--address HOST:PORT] ` +
                "--image FILE --question TEXT [--methods a,b] [--timeout-s S]");
  process.exit(64);
}

function loadProto(protoDir: string): Proto {
  const definition = protoLoader.loadSync(PROTO_FILES, {
    ...LOADER_OPTIONS, includeDirs: [protoDir, path.join(HERE, "proto")] });
  return grpc.loadPackageDefinition(definition) as unknown as Proto;
}

// The google.rpc.Status of a failed call, decoded, as lines to print (the gateway always sends
// one; other servers may not).
function statusDetails(proto: Proto, err: grpc.ServiceError): string[] {
  const [raw] = err.metadata.get(STATUS_DETAILS_KEY);
  if (!raw) {
    return [];
  }
  const status = proto.google.rpc.Status.deserialize(Buffer.from(raw as Buffer));
  const lines: string[] = [];
  for (const detail of status.details) {
    const typeName = detail.type_url.slice(detail.type_url.lastIndexOf("/") + 1);
    if (typeName === "google.rpc.BadRequest") {
      for (const v of proto.google.rpc.BadRequest.deserialize(detail.value).fieldViolations) {
        lines.push(`field violation: ${v.field}: ${v.description}`);
      }
    } else if (typeName === "google.rpc.RetryInfo") {
      const delay = proto.google.rpc.RetryInfo.deserialize(detail.value).retryDelay;
      lines.push(`retry after: ${Number(delay?.seconds ?? 0) + (delay?.nanos ?? 0) / 1e9} s`);
    } else {
      lines.push(`detail: ${typeName}`);
    }
  }
  return lines;
}

function printResponse(response: ExplainResponse__Output): void {
  console.log(`answer: ${response.answer}`);
  console.log(`model: ${response.model?.name} ${response.model?.version}`);
  for (const map of response.heatmaps) {
    console.log(`heatmap ${map.method}: ${map.height}x${map.width} ${map.encoding}, ` +
                `${map.data.length} bytes`);
  }
}

function main(): void {
  const { values } = parseArgs({
    options: {
      address: { type: "string", default: process.env.LVLM_ADDRESS ?? "127.0.0.1:50051" },
      image: { type: "string", default: process.env.LVLM_IMAGE },
      question: { type: "string", default: process.env.LVLM_QUESTION },
      methods: { type: "string", default: "" },
      "timeout-s": { type: "string", default: "30" },
      "proto-dir": { type: "string",
                     default: process.env.LVLM_PROTO_DIR ?? path.resolve(HERE, "..", "..", "proto") },
    },
  });
  if (!values.image) usage("--image (or LVLM_IMAGE) is required");
  if (values.question === undefined) usage("--question (or LVLM_QUESTION) is required");
  const timeoutS = Number(values["timeout-s"]);
  if (!(timeoutS > 0)) usage(`--timeout-s: expected a positive number, got '${values["timeout-s"]}'`);

  const proto = loadProto(values["proto-dir"]!);
  const client = new proto.lvlm.v1.Explainer(values.address!, grpc.credentials.createInsecure(), {
    "grpc.max_receive_message_length": 64 << 20,  // per-token maps, overlays: above 4 MiB
  });
  const request: ExplainRequest = {
    image: fs.readFileSync(values.image),
    question: values.question,
    methods: values.methods ? values.methods.split(",") : [],
  };
  // The deadline travels to the handler (ExplainRequest.timeout_ms, docs/api.md "Deadlines").
  client.Explain(request, { deadline: Date.now() + timeoutS * 1000 }, (err, response) => {
    client.close();
    if (err) {
      console.error(`error: ${grpc.status[err.code]} (${err.code}): ${err.details}`);
      for (const line of statusDetails(proto, err)) {
        console.error(`  ${line}`);
      }
      process.exitCode = err.code === grpc.status.INVALID_ARGUMENT ? 2 : 1;
      return;
    }
    printResponse(response!);
  });
}

main();
