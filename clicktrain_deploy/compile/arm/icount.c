/* QEMU TCG plugin: counts retired guest instructions and writes the total to out=PATH at exit.
 * Declares the few plugin-API functions it uses (QEMU 7.2's API version 1), so it needs no QEMU
 * headers. Deterministic for a single-threaded guest. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
typedef void (*tb_translated_fn)(qemu_plugin_id_t, struct qemu_plugin_tb *);
typedef void (*tb_executed_fn)(unsigned int, void *);
typedef void (*exit_fn)(qemu_plugin_id_t, void *);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t, tb_translated_fn);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *, tb_executed_fn, int, void *);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t, exit_fn, void *);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

static uint64_t retired;
static char out_path[4096];

static void on_block_executed(unsigned int vcpu, void *insns) {
  __atomic_fetch_add(&retired, (uint64_t)(uintptr_t)insns, __ATOMIC_RELAXED);
}

static void on_block_translated(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  qemu_plugin_register_vcpu_tb_exec_cb(tb, on_block_executed, 0,
                                       (void *)(uintptr_t)qemu_plugin_tb_n_insns(tb));
}

static void on_exit(qemu_plugin_id_t id, void *unused) {
  FILE *f = fopen(out_path, "w");
  if (f) {
    fprintf(f, "%llu\n", (unsigned long long)retired);
    fclose(f);
  }
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const void *info,
                                                               int argc, char **argv) {
  for (int i = 0; i < argc; i++)
    if (!strncmp(argv[i], "out=", 4)) snprintf(out_path, sizeof out_path, "%s", argv[i] + 4);
  if (!out_path[0]) return -1;
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_block_translated);
  qemu_plugin_register_atexit_cb(id, on_exit, NULL);
  return 0;
}
