/* Stand-in for libnvinfer.so.N: the symbols the tensorrt bindings link against, so that they import without
   TensorRT's libraries or a GPU. The contract test only introspects; every factory returns NULL (no object). */
#include <stddef.h>

void *createInferBuilder_INTERNAL(void *logger, int version) { return NULL; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return NULL; }
void *createInferRuntime_INTERNAL(void *logger, int version) { return NULL; }
void *getBuilderPluginRegistry(int capability) { return NULL; }
void *getPluginRegistry(void) { return NULL; }
void *getLogger(void) { return NULL; }
int getInferLibVersion(void) { return 0; }
