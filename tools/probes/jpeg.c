/* Build probe (Makefile): libjpeg(-turbo) links and runs (image folders). */
#include <stdio.h>
#include <jpeglib.h>
int main(void) {
    struct jpeg_error_mgr e;
    printf("libjpeg %d\n", JPEG_LIB_VERSION);
    return jpeg_std_error(&e) != &e;
}
