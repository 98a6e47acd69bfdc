/* Stand-in for libnvinfer_plugin.so.N (see nvinfer.c): registers no plugins. */
#include <stdbool.h>

bool initLibNvInferPlugins(void *logger, const char *lib_namespace) { return false; }
