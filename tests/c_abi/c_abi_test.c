/* The C ABI from C99: world-1, loopback and (with RINGATTN_C_TEST_MPI) MPI rings against the fp64 reference, and the status codes. */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef RINGATTN_C_TEST_MPI
#include <mpi.h>
#endif

#include "ringattn/ringattn_c.h"

#define FWD_TOL 1e-12
#define BWD_TOL 1e-11
#define ALIGNMENT 256
#define TIMEOUT_MS 60000.0

static int g_failures = 0;
static int g_rank = 0;

#define CHECK(cond, ...)                                           \
  do {                                                             \
    if (!(cond)) {                                                 \
      fprintf(stderr, "[rank %d] FAILED %s:%d: ", g_rank, __FILE__, __LINE__); \
      fprintf(stderr, __VA_ARGS__);                                \
      fprintf(stderr, "\n");                                       \
      ++g_failures;                                                \
    }                                                              \
  } while (0)

#define CHECK_OK(call)                                                                        \
  do {                                                                                        \
    ringattn_status st_ = (call);                                                             \
    CHECK(st_ == RINGATTN_OK, "%s -> %d (%s): %s", #call, (int)st_, ringattn_status_string(st_), \
          ringattn_last_error());                                                             \
  } while (0)

/* ---- tensors ---------------------------------------------------------------------------- */

static ringattn_tensor tensor4(double* data, int64_t a, int64_t b, int64_t c, int64_t d) {
  ringattn_tensor t;
  memset(&t, 0, sizeof t);
  t.struct_size = sizeof t;
  t.data = data;
  t.dtype = RINGATTN_DTYPE_F64;
  t.ndim = 4;
  t.shape[0] = a; t.shape[1] = b; t.shape[2] = c; t.shape[3] = d;
  t.stride[3] = 1; t.stride[2] = d; t.stride[1] = c * d; t.stride[0] = b * c * d;
  return t;
}

static ringattn_tensor tensor3(double* data, int64_t a, int64_t b, int64_t c) {
  ringattn_tensor t;
  memset(&t, 0, sizeof t);
  t.struct_size = sizeof t;
  t.data = data;
  t.dtype = RINGATTN_DTYPE_F64;
  t.ndim = 3;
  t.shape[0] = a; t.shape[1] = b; t.shape[2] = c;
  t.stride[2] = 1; t.stride[1] = c; t.stride[0] = b * c;
  return t;
}

static double* fill_random(int64_t n, unsigned long long seed) {
  double* p = (double*)malloc((size_t)n * sizeof(double));
  int64_t i;
  for (i = 0; i < n; ++i) {
    seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
    p[i] = seed == 0 ? 0.0 : ((double)(seed >> 11) / 9007199254740992.0) * 4.0 - 2.0;
  }
  return p;
}

static double* zeros(int64_t n) { return (double*)calloc((size_t)n, sizeof(double)); }

/* Rows `pos` of a (B, S, H, D) global tensor -> (B, n, H, D), or of (B, H, S) -> (B, H, n) when D == 0. */
static double* shard(const double* g, int64_t B, int64_t S, int64_t H, int64_t D, const int64_t* pos, int64_t n) {
  double* l = zeros(B * n * H * (D ? D : 1));
  int64_t b, i, h;
  for (b = 0; b < B; ++b) {
    for (i = 0; i < n; ++i) {
      if (D) {
        memcpy(l + ((b * n + i) * H) * D, g + ((b * S + pos[i]) * H) * D, (size_t)(H * D) * sizeof(double));
      } else {
        for (h = 0; h < H; ++h) l[(b * H + h) * n + i] = g[(b * H + h) * S + pos[i]];
      }
    }
  }
  return l;
}

static double max_err(const double* a, const double* b, int64_t n) {
  double e = 0.0;
  int64_t i;
  for (i = 0; i < n; ++i) {
    if (isinf(a[i]) && isinf(b[i]) && (a[i] > 0) == (b[i] > 0)) continue; /* -inf lse of a row that sees nothing */
    {
      const double d = fabs(a[i] - b[i]);
      if (isnan(d)) return INFINITY;
      if (d > e) e = d;
    }
  }
  return e;
}

static void* aligned_workspace(size_t bytes) {
  void* p = NULL;
  if (bytes == 0) return NULL;
  if (posix_memalign(&p, ALIGNMENT, bytes) != 0) return NULL;
  memset(p, 0xff, bytes); /* NaN garbage: a pass must not read what it did not write */
  return p;
}

/* ---- one problem: global inputs and the reference ---------------------------------------- */

typedef struct {
  ringattn_spec spec;
  int64_t B, S, H, Hkv, D;
  double *q, *k, *v, *dout;        /* global inputs */
  double *out, *lse, *dq, *dk, *dv; /* the reference */
} Problem;

static void problem_init(Problem* p, const ringattn_spec* spec) {
  ringattn_tensor tq, tk, tv, tdo, to, tl, tdq, tdk, tdv;
  p->spec = *spec;
  p->B = spec->batch; p->S = spec->seq_len; p->H = spec->heads;
  p->Hkv = spec->kv_heads ? spec->kv_heads : spec->heads; p->D = spec->head_dim;
  p->q = fill_random(p->B * p->S * p->H * p->D, 1);
  p->k = fill_random(p->B * p->S * p->Hkv * p->D, 2);
  p->v = fill_random(p->B * p->S * p->Hkv * p->D, 3);
  p->dout = fill_random(p->B * p->S * p->H * p->D, 4);
  p->out = zeros(p->B * p->S * p->H * p->D);
  p->lse = zeros(p->B * p->H * p->S);
  p->dq = zeros(p->B * p->S * p->H * p->D);
  p->dk = zeros(p->B * p->S * p->Hkv * p->D);
  p->dv = zeros(p->B * p->S * p->Hkv * p->D);
  tq = tensor4(p->q, p->B, p->S, p->H, p->D);
  tk = tensor4(p->k, p->B, p->S, p->Hkv, p->D);
  tv = tensor4(p->v, p->B, p->S, p->Hkv, p->D);
  tdo = tensor4(p->dout, p->B, p->S, p->H, p->D);
  to = tensor4(p->out, p->B, p->S, p->H, p->D);
  tl = tensor3(p->lse, p->B, p->H, p->S);
  tdq = tensor4(p->dq, p->B, p->S, p->H, p->D);
  tdk = tensor4(p->dk, p->B, p->S, p->Hkv, p->D);
  tdv = tensor4(p->dv, p->B, p->S, p->Hkv, p->D);
  CHECK_OK(ringattn_reference_forward(spec, &tq, &tk, &tv, &to, &tl));
  CHECK_OK(ringattn_reference_backward(spec, &tq, &tk, &tv, &tdo, &tdq, &tdk, &tdv));
}

static void problem_free(Problem* p) {
  free(p->q); free(p->k); free(p->v); free(p->dout);
  free(p->out); free(p->lse); free(p->dq); free(p->dk); free(p->dv);
}

/* ---- one rank: forward and backward through the ABI, compared with the reference --------- */

typedef struct {
  const Problem* p;
  ringattn_ring ring;
  const char* name;
} RankJob;

static void* run_rank(void* arg) {
  RankJob* job = (RankJob*)arg;
  const Problem* p = job->p;
  int32_t rank = -1, world = 0;
  int64_t n = 0, *pos;
  int call;
  CHECK_OK(ringattn_ring_info(job->ring, &rank, &world, &n));
  pos = (int64_t*)malloc((size_t)n * sizeof(int64_t));
  CHECK_OK(ringattn_ring_positions(job->ring, pos, n));
  {
    double* lq = shard(p->q, p->B, p->S, p->H, p->D, pos, n);
    double* lk = shard(p->k, p->B, p->S, p->Hkv, p->D, pos, n);
    double* lv = shard(p->v, p->B, p->S, p->Hkv, p->D, pos, n);
    double* ldo = shard(p->dout, p->B, p->S, p->H, p->D, pos, n);
    double* ro = shard(p->out, p->B, p->S, p->H, p->D, pos, n);
    double* rl = shard(p->lse, p->B, p->S, p->H, 0, pos, n);
    double* rdq = shard(p->dq, p->B, p->S, p->H, p->D, pos, n);
    double* rdk = shard(p->dk, p->B, p->S, p->Hkv, p->D, pos, n);
    double* rdv = shard(p->dv, p->B, p->S, p->Hkv, p->D, pos, n);
    double* out = zeros(p->B * n * p->H * p->D);
    double* lse = zeros(p->B * p->H * n);
    double* dq = zeros(p->B * n * p->H * p->D);
    double* dk = zeros(p->B * n * p->Hkv * p->D);
    double* dv = zeros(p->B * n * p->Hkv * p->D);
    ringattn_tensor tq = tensor4(lq, p->B, n, p->H, p->D), tk = tensor4(lk, p->B, n, p->Hkv, p->D);
    ringattn_tensor tv = tensor4(lv, p->B, n, p->Hkv, p->D), tdo = tensor4(ldo, p->B, n, p->H, p->D);
    ringattn_tensor to = tensor4(out, p->B, n, p->H, p->D), tl = tensor3(lse, p->B, p->H, n);
    ringattn_tensor tdq = tensor4(dq, p->B, n, p->H, p->D), tdk = tensor4(dk, p->B, n, p->Hkv, p->D);
    ringattn_tensor tdv = tensor4(dv, p->B, n, p->Hkv, p->D);
    size_t fwd_bytes = 0, bwd_bytes = 0;
    CHECK_OK(ringattn_workspace_bytes(job->ring, RINGATTN_PASS_FORWARD, &fwd_bytes));
    CHECK_OK(ringattn_workspace_bytes(job->ring, RINGATTN_PASS_BACKWARD, &bwd_bytes));
    for (call = 0; call < 2; ++call) { /* the second call reuses the ring's plan with new workspaces */
      void* fws = aligned_workspace(fwd_bytes);
      void* bws = aligned_workspace(bwd_bytes);
      CHECK_OK(ringattn_forward(job->ring, &tq, &tk, &tv, &to, &tl, fws, fwd_bytes, NULL));
      CHECK_OK(ringattn_backward(job->ring, &tq, &tk, &tv, &to, &tl, &tdo, &tdq, &tdk, &tdv, bws, bwd_bytes, NULL));
      CHECK_OK(ringattn_poll(job->ring));
      free(fws);
      free(bws);
      CHECK(max_err(out, ro, p->B * n * p->H * p->D) < FWD_TOL, "%s rank %d/%d: out differs by %g", job->name, rank,
            world, max_err(out, ro, p->B * n * p->H * p->D));
      CHECK(max_err(lse, rl, p->B * p->H * n) < FWD_TOL, "%s rank %d: lse differs", job->name, rank);
      CHECK(max_err(dq, rdq, p->B * n * p->H * p->D) < BWD_TOL, "%s rank %d: dq differs by %g", job->name, rank,
            max_err(dq, rdq, p->B * n * p->H * p->D));
      CHECK(max_err(dk, rdk, p->B * n * p->Hkv * p->D) < BWD_TOL, "%s rank %d: dk differs", job->name, rank);
      CHECK(max_err(dv, rdv, p->B * n * p->Hkv * p->D) < BWD_TOL, "%s rank %d: dv differs", job->name, rank);
    }
    free(lq); free(lk); free(lv); free(ldo); free(ro); free(rl); free(rdq); free(rdk); free(rdv);
    free(out); free(lse); free(dq); free(dk); free(dv);
  }
  free(pos);
  return NULL;
}

static ringattn_ring_options ring_options(int embedded) {
  ringattn_ring_options o;
  memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  o.device = -1;
  o.embedded = embedded;
  return o;
}

static ringattn_transport_desc transport_desc(int32_t kind) {
  ringattn_transport_desc t;
  memset(&t, 0, sizeof t);
  t.struct_size = sizeof t;
  t.kind = kind;
  t.timeout_ms = TIMEOUT_MS;
  return t;
}

/* world 1 (LOCAL) or `world` loopback ranks, one thread each. */
static void run_case(const ringattn_spec* spec, int world, int embedded, const char* name) {
  Problem p;
  ringattn_loopback lb = NULL;
  ringattn_ring rings[8];
  RankJob jobs[8];
  pthread_t threads[8];
  int r;
  problem_init(&p, spec);
  if (world > 1) CHECK_OK(ringattn_loopback_create(world, -1, TIMEOUT_MS, &lb));
  for (r = 0; r < world; ++r) {
    ringattn_transport_desc t = transport_desc(world > 1 ? RINGATTN_TRANSPORT_LOOPBACK : RINGATTN_TRANSPORT_LOCAL);
    ringattn_ring_options o = ring_options(embedded);
    t.loopback = lb;
    t.rank = r;
    rings[r] = NULL;
    CHECK_OK(ringattn_ring_create(spec, &t, &o, &rings[r]));
    jobs[r].p = &p;
    jobs[r].ring = rings[r];
    jobs[r].name = name;
  }
  if (g_failures == 0) {
    for (r = 0; r < world; ++r) pthread_create(&threads[r], NULL, run_rank, &jobs[r]);
    for (r = 0; r < world; ++r) pthread_join(threads[r], NULL);
  }
  for (r = 0; r < world; ++r) ringattn_ring_destroy(rings[r]);
  if (lb) ringattn_loopback_destroy(lb);
  problem_free(&p);
  printf("%s p=%d %s: %s\n", name, world, embedded ? "embedded" : "blocking", g_failures ? "FAILED so far" : "ok");
}

static ringattn_spec base_spec(void) {
  ringattn_spec s;
  memset(&s, 0, sizeof s);
  s.struct_size = sizeof s;
  s.batch = 2;
  s.seq_len = 48;
  s.heads = 4;
  s.kv_heads = 2;
  s.head_dim = 8;
  s.dtype = RINGATTN_DTYPE_F64;
  s.layout = RINGATTN_LAYOUT_CONTIGUOUS;
  s.window_left = -1;
  s.window_right = -1;
  return s;
}

/* ---- status codes and messages ------------------------------------------------------------ */

static void check_statuses(void) {
  ringattn_spec spec = base_spec();
  ringattn_transport_desc t = transport_desc(RINGATTN_TRANSPORT_LOCAL);
  ringattn_ring_options o = ring_options(1);
  ringattn_ring ring = NULL;
  ringattn_status st;
  double q[2 * 48 * 4 * 8], k[2 * 48 * 2 * 8], v[2 * 48 * 2 * 8], out[2 * 48 * 4 * 8], lse[2 * 4 * 48];
  ringattn_tensor tq = tensor4(q, 2, 48, 4, 8), tk = tensor4(k, 2, 48, 2, 8), tv = tensor4(v, 2, 48, 2, 8);
  ringattn_tensor to = tensor4(out, 2, 48, 4, 8), tl = tensor3(lse, 2, 4, 48), bad;
  memset(q, 0, sizeof q); memset(k, 0, sizeof k); memset(v, 0, sizeof v);

  CHECK(ringattn_api_version() >> 16 == RINGATTN_C_API_MAJOR, "api version %u", ringattn_api_version());
  CHECK(strcmp(ringattn_status_string(RINGATTN_OK), "ok") == 0, "status string of OK");
  CHECK(RINGATTN_ERR_INVALID_ARGUMENT == 1 && RINGATTN_ERR_UNSUPPORTED == 7 && RINGATTN_ERR_INTERNAL == 10,
        "fixed status values");

  st = ringattn_ring_create(NULL, &t, &o, &ring);
  CHECK(st == RINGATTN_ERR_INVALID_ARGUMENT && ring == NULL, "null spec -> %d", (int)st);
  CHECK(strstr(ringattn_last_error(), "ringattn_spec is NULL") != NULL, "message: %s", ringattn_last_error());
  CHECK(strstr(ringattn_last_error(), "rank") != NULL, "the message names the rank: %s", ringattn_last_error());

  spec.struct_size = sizeof spec - 8;
  st = ringattn_ring_create(&spec, &t, &o, &ring);
  CHECK(st == RINGATTN_ERR_INVALID_ARGUMENT, "too small struct_size -> %d", (int)st);
  CHECK(strstr(ringattn_last_error(), "struct_size") != NULL, "message: %s", ringattn_last_error());
  spec.struct_size = sizeof spec;

  spec.dtype = 9;
  st = ringattn_ring_create(&spec, &t, &o, &ring);
  CHECK(st == RINGATTN_ERR_UNSUPPORTED, "unknown dtype -> %d: %s", (int)st, ringattn_last_error());
  spec.dtype = RINGATTN_DTYPE_F64;

  t.kind = 42;
  st = ringattn_ring_create(&spec, &t, &o, &ring);
  CHECK(st == RINGATTN_ERR_UNSUPPORTED, "unknown transport -> %d: %s", (int)st, ringattn_last_error());
  t.kind = RINGATTN_TRANSPORT_LOCAL;

  spec.heads = 3; /* not a multiple of kv_heads */
  st = ringattn_ring_create(&spec, &t, &o, &ring);
  CHECK(st == RINGATTN_ERR_INVALID_ARGUMENT, "heads 3 over kv heads 2 -> %d: %s", (int)st, ringattn_last_error());
  spec.heads = 4;

  CHECK_OK(ringattn_ring_create(&spec, &t, &o, &ring));
  CHECK(strcmp(ringattn_last_error(), "") == 0, "a successful call clears the message");

  st = ringattn_forward(ring, NULL, &tk, &tv, &to, &tl, NULL, 0, NULL);
  CHECK(st == RINGATTN_ERR_INVALID_ARGUMENT, "null q -> %d", (int)st);
  bad = tq;
  bad.shape[1] = 47; /* mis-shaped */
  bad.stride[0] = 47 * 4 * 8;
  st = ringattn_forward(ring, &bad, &tk, &tv, &to, &tl, NULL, 0, NULL);
  CHECK(st == RINGATTN_ERR_INVALID_ARGUMENT, "mis-shaped q -> %d: %s", (int)st, ringattn_last_error());
  bad = tq;
  bad.dtype = RINGATTN_DTYPE_F32; /* wrongly typed */
  st = ringattn_forward(ring, &bad, &tk, &tv, &to, &tl, NULL, 0, NULL);
  CHECK(st == RINGATTN_ERR_INVALID_ARGUMENT, "fp32 q in an fp64 ring -> %d: %s", (int)st, ringattn_last_error());
  bad = tq;
  bad.stride[3] = 2; /* not contiguous */
  st = ringattn_forward(ring, &bad, &tk, &tv, &to, &tl, NULL, 0, NULL);
  CHECK(st == RINGATTN_ERR_INVALID_ARGUMENT, "strided q -> %d", (int)st);
  bad = tl;
  bad.struct_size = 4;
  st = ringattn_forward(ring, &tq, &tk, &tv, &to, &bad, NULL, 0, NULL);
  CHECK(st == RINGATTN_ERR_INVALID_ARGUMENT, "lse with a too small struct_size -> %d", (int)st);
  st = ringattn_workspace_bytes(ring, 5, NULL);
  CHECK(st == RINGATTN_ERR_INVALID_ARGUMENT, "workspace of pass 5 -> %d", (int)st);
  CHECK_OK(ringattn_forward(ring, &tq, &tk, &tv, &to, &tl, NULL, 0, NULL)); /* world 1 on the CPU: no workspace */
  CHECK_OK(ringattn_poll(ring));
  ringattn_ring_destroy(ring);

  o.device = 0; /* a CUDA ring: unsupported without CUDA; with CUDA but no GPU, a CUDA error */
  st = ringattn_ring_create(&spec, &t, &o, &ring);
  if (st == RINGATTN_OK) {
    ringattn_ring_destroy(ring);
  } else {
    CHECK(st == RINGATTN_ERR_UNSUPPORTED || st == RINGATTN_ERR_CUDA || st == RINGATTN_ERR_INVALID_ARGUMENT,
          "device 0 -> %d: %s", (int)st, ringattn_last_error());
  }
  ringattn_ring_destroy(NULL); /* harmless */
  printf("status codes: %s\n", g_failures ? "FAILED so far" : "ok");
}

/* A failed pass through the ABI: a loopback peer that never runs. */
static void check_kept_failure(void) {
  ringattn_spec spec = base_spec();
  ringattn_loopback lb = NULL;
  ringattn_ring ring = NULL;
  ringattn_transport_desc t = transport_desc(RINGATTN_TRANSPORT_LOOPBACK);
  ringattn_ring_options o = ring_options(1);
  ringattn_status st;
  size_t bytes = 0;
  void* ws;
  static double q[2 * 24 * 4 * 8], k[2 * 24 * 2 * 8], v[2 * 24 * 2 * 8], out[2 * 24 * 4 * 8], lse[2 * 4 * 24];
  ringattn_tensor tq = tensor4(q, 2, 24, 4, 8), tk = tensor4(k, 2, 24, 2, 8), tv = tensor4(v, 2, 24, 2, 8);
  ringattn_tensor to = tensor4(out, 2, 24, 4, 8), tl = tensor3(lse, 2, 4, 24);
  CHECK_OK(ringattn_loopback_create(2, -1, 200.0, &lb));
  t.loopback = lb;
  t.rank = 0;
  CHECK_OK(ringattn_ring_create(&spec, &t, &o, &ring));
  CHECK_OK(ringattn_workspace_bytes(ring, RINGATTN_PASS_FORWARD, &bytes));
  ws = aligned_workspace(bytes);
  st = ringattn_forward(ring, &tq, &tk, &tv, &to, &tl, ws, bytes, NULL);
  CHECK(st == RINGATTN_ERR_COMM, "a silent peer -> %d: %s", (int)st, ringattn_last_error());
  CHECK(isnan(out[0]) && isnan(out[sizeof out / sizeof out[0] - 1]) && isnan(lse[0]), "a failed pass writes NaN");
  st = ringattn_poll(ring);
  CHECK(st == RINGATTN_ERR_ABORTED, "poll after a failure -> %d", (int)st);
  CHECK(strstr(ringattn_last_error(), "timed out") != NULL, "kept message: %s", ringattn_last_error());
  st = ringattn_forward(ring, &tq, &tk, &tv, &to, &tl, ws, bytes, NULL);
  CHECK(st == RINGATTN_ERR_ABORTED, "the next call -> %d", (int)st);
  free(ws);
  ringattn_ring_destroy(ring);
  ringattn_loopback_destroy(lb);
  printf("kept failure: %s\n", g_failures ? "FAILED so far" : "ok");
}

#ifdef RINGATTN_C_TEST_MPI
/* Every rank of MPI_COMM_WORLD: one ring over the borrowed communicator, blocking and embedded. */
static void run_mpi(const ringattn_spec* spec, int embedded, const char* name) {
  Problem p;
  RankJob job;
  ringattn_transport_desc t = transport_desc(RINGATTN_TRANSPORT_MPI);
  ringattn_ring_options o = ring_options(embedded);
  ringattn_ring ring = NULL;
  problem_init(&p, spec);
  t.mpi_comm = (int64_t)MPI_Comm_c2f(MPI_COMM_WORLD);
  CHECK_OK(ringattn_ring_create(spec, &t, &o, &ring));
  if (ring) {
    job.p = &p;
    job.ring = ring;
    job.name = name;
    run_rank(&job);
    ringattn_ring_destroy(ring);
  }
  problem_free(&p);
}
#endif

int main(void) {
  ringattn_spec spec;
  int world, total;
#ifdef RINGATTN_C_TEST_MPI
  MPI_Init(NULL, NULL);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  spec = base_spec();
  run_mpi(&spec, 0, "mpi dense");
  run_mpi(&spec, 1, "mpi dense");
  spec.causal = 1;
  run_mpi(&spec, 1, "mpi causal");
  spec.num_docs = 3;
  {
    static const int64_t docs[4] = {0, 10, 30, 48};
    spec.doc_offsets = docs;
    run_mpi(&spec, 1, "mpi causal docs");
  }
  MPI_Allreduce(&g_failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (g_rank == 0) printf("c_abi mpi: %s\n", total ? "FAILED" : "OK");
  MPI_Finalize();
  return total ? 1 : 0;
#else
  static const int64_t docs[4] = {0, 10, 30, 48};
  check_statuses();
  for (world = 1; world <= 4; ++world) {
    spec = base_spec();
    run_case(&spec, world, 1, "dense");
    if (world == 2) run_case(&spec, world, 0, "dense");
    spec.causal = 1;
    spec.layout = RINGATTN_LAYOUT_AUTO;
    run_case(&spec, world, 1, "causal auto");
    spec.has_window = 1;
    spec.window_left = 5;
    spec.window_right = 0;
    spec.global_tokens = 2;
    spec.mask_heads = 2;
    spec.num_docs = 3;
    spec.doc_offsets = docs;
    run_case(&spec, world, 1, "causal window+global heads<2 docs");
  }
  check_kept_failure();
  total = g_failures;
  printf("c_abi: %s (%d failures)\n", total ? "FAILED" : "OK", total);
  return total ? 1 : 0;
#endif
}
