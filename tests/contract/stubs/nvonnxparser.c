/* Stand-in for libnvonnxparser.so.N (see nvinfer.c): no parser objects. */
#include <stddef.h>

void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return NULL; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return NULL; }
int getNvOnnxParserVersion(void) { return 0; }
