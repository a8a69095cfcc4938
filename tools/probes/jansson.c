/* Build probe (Makefile): jansson links and runs (the safetensors header, excb.c section 16b). */
#include <jansson.h>
#include <stdio.h>
int main(void) {
    json_t *j = json_loads("{\"a\": [1, 2]}", JSON_REJECT_DUPLICATES, NULL);
    printf("jansson %s\n", jansson_version_str());
    int ok = j && json_array_size(json_object_get(j, "a")) == 2;
    json_decref(j);
    return !ok;
}
