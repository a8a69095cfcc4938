/* Build probe (Makefile): libpng links and runs (image folders, excb views). */
#include <png.h>
#include <stdio.h>
int main(void) {
    printf("libpng %lu\n", (unsigned long)png_access_version_number());
    return png_access_version_number() == 0;
}
