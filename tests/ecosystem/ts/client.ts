// A small optd client typed by the types openapi-typescript generates from
// the daemon's /v1/openapi.json (tests/ecosystem/test_typescript.py writes
// them to ./api.d.ts). tsc --strict must accept it as it is, and it then
// runs against the daemon at the URL given as its argument.
import type { components, paths } from "./api";

declare const process: { argv: string[]; exit(code: number): never }; // node's, without @types/node

type Json<T> = T extends { content: { "application/json": infer J } } ? J : never;
type Body<T> = T extends { requestBody?: { content: { "application/json": infer J } } } ? J : never;

type CreateBody = Body<paths["/v1/sessions"]["post"]>;
type Session = Json<paths["/v1/sessions"]["post"]["responses"][201]>;
type PatchBody = Body<paths["/v1/sessions/{name}"]["patch"]>;
type StepBody = Body<paths["/v1/sessions/{name}/step"]["post"]>;
type StepContent = paths["/v1/sessions/{name}/step"]["post"]["responses"][200]["content"];
type StepReply = StepContent["application/json"];
type AnyStepReply = StepContent[keyof StepContent]; // the JSON reply or the binary params
type Params = Json<paths["/v1/sessions/{name}/params"]["get"]["responses"][200]>;
type Checkpoint = Json<paths["/v1/sessions/{name}/state"]["get"]["responses"][200]>;
type Restore = Body<paths["/v1/sessions/{name}/state"]["put"]>;
type Page = Json<paths["/v1/sessions"]["get"]["responses"][200]>;
type ListQuery = NonNullable<paths["/v1/sessions"]["get"]["parameters"]["query"]>;
type Err = components["schemas"]["Error"];
type Binary = components["schemas"]["Binary"];

// Request fields with defaults are optional: the smallest bodies type-check.
const create: CreateBody = { name: "ts-" + Date.now().toString(36), optimizer: "adam", size: 3 };
const patch: PatchBody = { hyperparams: { lr: 0.02 } };
const step: StepBody = { grad: [0.1, -0.2, 0.3] };
const query: ListQuery = {}; // limit and after are optional too

// The step reply keeps its type beside the binary alternative.
function stepOf(r: AnyStepReply): number | null {
  return typeof r === "string" ? null : r.step;
}
const binary: Binary = "raw bytes are a string of the document's format: binary";

async function call<T>(base: string, method: string, path: string, body?: unknown): Promise<[number, T]> {
  const r = await fetch(base + path, {
    method,
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  if (!text.endsWith("\n")) throw new Error(`${method} ${path}: the JSON reply does not end with a newline`);
  return [r.status, JSON.parse(text) as T];
}

function check(ok: boolean, what: string): void {
  if (!ok) throw new Error("ts client: " + what);
}

async function main(base: string): Promise<void> {
  const [st, s] = await call<Session>(base, "POST", "/v1/sessions", create);
  check(st === 201 && s.name === create.name && s.size === 3 && s.step === 0, "create " + st);
  const name = encodeURIComponent(s.name);
  const [st2, r] = await call<StepReply>(base, "POST", `/v1/sessions/${name}/step`, step);
  check(st2 === 200 && stepOf(r) === 1 && (r.params ?? []).length === 3, "step");
  const [, p] = await call<Params>(base, "GET", `/v1/sessions/${name}/params`);
  check(p.step === 1 && p.params.length === 3, "params");
  const [, s2] = await call<Session>(base, "PATCH", `/v1/sessions/${name}`, patch);
  check(s2.hyperparams.lr === 0.02, "patch");
  const [, ck] = await call<Checkpoint>(base, "GET", `/v1/sessions/${name}/state`);
  const restore: Restore = ck; // whatever GET returns, PUT takes
  const [st3] = await call<Session>(base, "PUT", `/v1/sessions/${name}-copy/state`, restore);
  check(st3 === 201, "restore " + st3);
  const [st4, e] = await call<Err>(base, "POST", "/v1/sessions", { ...create, lr: 0.1 });
  check(st4 === 422 && e.error.code === "unknown_field", "strict body");
  const [, page] = await call<Page>(base, "GET", "/v1/sessions?limit=1000");
  check(page.sessions.some((x) => x.name === s.name) && query.limit === undefined && binary.length > 0, "list");
  console.log("ts client ok");
}

main(process.argv[2]).catch((err: unknown) => {
  console.error(err instanceof Error ? err.message : err);
  process.exit(1);
});
