// The app's logic as plain Kotlin (no Android dependency). It also compiles with kotlinc 1.3,
// which is how the repository's `make test` builds and tests it against golden vectors.
plugins {
    id("org.jetbrains.kotlin.jvm")
}

kotlin {
    jvmToolchain(17)
}

dependencies {
    implementation("com.google.code.gson:gson:2.10.1")
    testImplementation("junit:junit:4.13.2")
}

tasks.test {
    // scripts/make_golden.py --bundle BUNDLE DIR writes the golden vectors; pass -PgoldenDir=DIR
    systemProperty("golden.dir", project.findProperty("goldenDir") ?: "")
}
