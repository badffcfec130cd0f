/*
 * qnn_htp_compat: a forwarding libQnnHtp.so that lets ExecuTorch 1.5.1's Qualcomm backend (built
 * against QNN 2.37 headers) drive the QNN 2.51 HTP library shipped in the onnxruntime-qnn wheel.
 *
 * Why: QnnHtpDevice_CustomConfig_t changed layout between the two: 2.37 puts its union at byte
 * offset 4, 2.51 at offset 8 (graph and context configs are unchanged). Passed through as is, 2.51
 * reads the SoC model from the wrong bytes ("unknown custom config socModel 0"). This library
 * exports QnnInterface_getProviders, returns copies of the real providers whose deviceCreate
 * rewrites every HTP device custom config into the 2.51 layout and drops the platform-info
 * device config (a device-side structure the x86 emulator does not take), then forwards.
 *
 * The real library is dlopen-ed from $AUTOGLM_QNN_HTP_LIBRARY. Built by the project's set-up:
 *   gcc -shared -fPIC -O2 -Wl,-soname,libQnnHtp.so -Wl,-z,nodelete -o libQnnHtp.so qnn_htp_compat.c -ldl
 * The soname makes a later dlopen("libQnnHtp.so") in the same process return this library.
 * Not needed (and not used) with a real QNN 2.37 SDK.
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t Qnn_ErrorHandle_t;
#define QNN_ERROR_GENERAL 1000u

typedef struct { uint32_t major, minor, patch; } QnnVersion;
typedef struct { QnnVersion core, backend; } QnnApiVersion;

/* QnnInterface_t: id, provider name, API versions, then the function table in header order. */
#define TABLE_SLOTS 96 /* more than any 2.x table holds; copied, never called past the real size */
#define DEVICE_CREATE_SLOT 40 /* propertyHasCapability = 0 ... deviceGetInfrastructure = 39 */
typedef struct {
  uint32_t backendId;
  const char *providerName;
  QnnApiVersion apiVersion;
  void *table[TABLE_SLOTS];
} QnnInterface;

/* QnnDevice_Config_t: option, then a union at offset 8 (custom config pointer / platform info). */
enum { DEVICE_CONFIG_CUSTOM = 0, DEVICE_CONFIG_PLATFORM_INFO = 1 };
typedef struct { int32_t option; void *payload; } DeviceConfig;

#define PAYLOAD_BYTES 16 /* the largest union member of QnnHtpDevice_CustomConfig_t in 2.37 */
#define MAX_CONFIGS 32
#define MAX_PROVIDERS 8

typedef Qnn_ErrorHandle_t (*GetProvidersFn)(const QnnInterface ***, uint32_t *);
typedef Qnn_ErrorHandle_t (*DeviceCreateFn)(void *logger, const DeviceConfig **config, void **device);

static DeviceCreateFn real_device_create;
static QnnInterface copies[MAX_PROVIDERS];
static const QnnInterface *copy_list[MAX_PROVIDERS];

/* 2.37 custom config {int32 option; union at 4} -> 2.51 {int32 option; union at 8}. */
static void *to_251_layout(const void *old_config) {
  unsigned char *fresh = calloc(1, 8 + PAYLOAD_BYTES);
  if (!fresh) return NULL;
  memcpy(fresh, old_config, 4);
  memcpy(fresh + 8, (const unsigned char *)old_config + 4, PAYLOAD_BYTES);
  return fresh;
}

static Qnn_ErrorHandle_t compat_device_create(void *logger, const DeviceConfig **config, void **device) {
  DeviceConfig rewritten[MAX_CONFIGS];
  const DeviceConfig *list[MAX_CONFIGS + 1];
  int n = 0;
  for (int i = 0; config && config[i] && n < MAX_CONFIGS; i++) {
    if (config[i]->option == DEVICE_CONFIG_PLATFORM_INFO) continue;
    rewritten[n] = *config[i];
    if (config[i]->option == DEVICE_CONFIG_CUSTOM && config[i]->payload) {
      rewritten[n].payload = to_251_layout(config[i]->payload); /* lives as long as the device */
      if (!rewritten[n].payload) return QNN_ERROR_GENERAL;
    }
    list[n] = &rewritten[n];
    n++;
  }
  list[n] = NULL;
  return real_device_create(logger, n ? list : NULL, device);
}

Qnn_ErrorHandle_t QnnInterface_getProviders(const QnnInterface ***providers, uint32_t *count) {
  const char *path = getenv("AUTOGLM_QNN_HTP_LIBRARY");
  if (!path) {
    fprintf(stderr, "qnn_htp_compat: AUTOGLM_QNN_HTP_LIBRARY is not set (path of the real libQnnHtp.so)\n");
    return QNN_ERROR_GENERAL;
  }
  void *real = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!real) {
    fprintf(stderr, "qnn_htp_compat: cannot load %s: %s\n", path, dlerror());
    return QNN_ERROR_GENERAL;
  }
  GetProvidersFn get = (GetProvidersFn)dlsym(real, "QnnInterface_getProviders");
  if (!get) return QNN_ERROR_GENERAL;
  const QnnInterface **real_list = NULL;
  uint32_t n = 0;
  Qnn_ErrorHandle_t err = get(&real_list, &n);
  if (err || !real_list) return err ? err : QNN_ERROR_GENERAL;
  if (n > MAX_PROVIDERS) n = MAX_PROVIDERS;
  for (uint32_t i = 0; i < n; i++) {
    copies[i] = *real_list[i];
    real_device_create = (DeviceCreateFn)copies[i].table[DEVICE_CREATE_SLOT];
    copies[i].table[DEVICE_CREATE_SLOT] = (void *)compat_device_create;
    copy_list[i] = &copies[i];
  }
  *providers = copy_list;
  *count = n;
  return 0;
}
